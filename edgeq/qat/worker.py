"""The QAT step itself, in its own process: ``TF_USE_LEGACY_KERAS=1`` (read once, when TensorFlow is first
imported) and the QAT packages on the path (``edgeq.qat.deps``). One JSON request on stdin, one JSON line out.

The Keras 3 model is rebuilt layer by layer in tf_keras (Keras 2, which tfmot needs) and its weights copied;
the rebuilt model must give the same outputs before anything trains. Only a plain chain of built-in layers
(a Sequential model, or a functional one without branches) is rebuilt: a subclassed or nested model, or one
whose layers branch, is refused naming the layer. Then ``tfmot.quantization.keras.quantize_model`` inserts
fake quantization (8-bit, per-channel weights, per-tensor activations), a short fine-tune runs, and the model
is saved as a SavedModel whose FakeQuant ops carry the learned ranges.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import traceback

REBUILD_TOLERANCE = 1e-4  # max |error| between the Keras 3 model and its tf_keras rebuild, relative to the outputs


class Refused(Exception):
    """A model or request this step cannot take; the message is the one line the user sees."""


def _chain(model) -> list:
    """The model's layers in order, refusing anything that is not a plain chain of built-in layers."""
    import keras

    if type(model) not in (keras.Sequential, keras.Model) and type(model).__name__ != "Functional":
        raise Refused(f"the model is a subclassed {type(model).__name__}: QAT rebuilds Sequential or functional "
                      "models of built-in layers only")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0] if len(model.inputs) == 1 else None
    if previous is None:
        raise Refused(f"the model has {len(model.inputs)} inputs: QAT takes a single-input model")
    for layer in layers:
        if isinstance(layer, keras.Model):
            raise Refused(f"layer '{layer.name}' is a nested model: QAT rebuilds flat models only")
        if not type(layer).__module__.startswith("keras."):
            raise Refused(f"layer '{layer.name}' is a custom {type(layer).__name__}: QAT rebuilds built-in layers")
        if not isinstance(model, keras.Sequential) and layer.input is not previous and not (isinstance(layer.input, list) and len(layer.input) == 1
                                                and layer.input[0] is previous):
            raise Refused(f"layer '{layer.name}' does not take the previous layer's output: QAT rebuilds chains "
                          "of layers without branches")
        previous = layer.output
    return layers


def _config_for(tf_keras_class, config: dict) -> dict:
    """A Keras 3 layer config as the tf_keras class takes it: only the arguments it accepts, no nested objects
    (initializers, regularizers, dtype policies): the weights are copied, and training uses the compile step's."""
    accepted = set(inspect.signature(tf_keras_class.__init__).parameters) | {"name", "trainable"}
    return {key: value for key, value in config.items()
            if key in accepted and not isinstance(value, dict) and key != "dtype"}


def rebuild(model):
    """The Keras 3 ``model`` as a tf_keras Sequential with the same weights."""
    import numpy as np
    import tf_keras

    layers = _chain(model)
    name = model.inputs[0].name.split(":")[0]
    rebuilt = [tf_keras.Input(shape=tuple(model.inputs[0].shape[1:]), name=name)]
    for layer in layers:
        cls = getattr(tf_keras.layers, type(layer).__name__, None)
        if cls is None:
            raise Refused(f"layer '{layer.name}' ({type(layer).__name__}) has no Keras 2 counterpart")
        rebuilt.append(cls(**_config_for(cls, layer.get_config())))
    twin = tf_keras.Sequential(rebuilt, name="qat_rebuild")
    for layer, copy in zip(layers, twin.layers, strict=True):
        weights = layer.get_weights()
        if len(weights) != len(copy.get_weights()):
            raise Refused(f"layer '{layer.name}': its weights do not map onto the Keras 2 layer")
        copy.set_weights([np.asarray(w) for w in weights])
    return twin


def init_ranges(quantized, twin, x) -> int:
    """Set every activation range of the QAT model from the float model's outputs on ``x`` (as a static PTQ
    calibration would), and return how many were set.

    tfmot starts activation ranges at [-6, 6] and moves them by an exponential average with decay 0.999, so a
    short fine-tune spends its steps on ranges that clip: measured on examples/qat/wide_range.py (3 epochs),
    the QAT TFLite artifact reached 90.4% top-1 from tfmot's start and 94.9% from calibrated ranges (FP32
    96.4%). NNCF likewise starts QAT from a PTQ calibration.
    """
    import numpy as np
    import tf_keras

    probe = tf_keras.Model(twin.inputs, [layer.output for layer in twin.layers])
    outputs = dict(zip((layer.name for layer in twin.layers), probe.predict(x, verbose=0), strict=True))
    ranges = {"quantize_layer": (float(np.min(x)), float(np.max(x)))}
    ranges.update({f"quant_{name}": (float(np.min(out)), float(np.max(out))) for name, out in outputs.items()})
    count = 0
    for layer in quantized.layers:
        low, high = ranges.get(layer.name, (None, None))
        if low is None:
            continue
        for variable in layer.non_trainable_variables:
            short = variable.name.split("/")[-1].split(":")[0]
            if short in ("quantize_layer_min", "post_activation_min"):
                variable.assign(min(low, 0.0))
                count += 1
            elif short in ("quantize_layer_max", "post_activation_max"):
                variable.assign(max(high, 0.0))
    return count


def _loss(tf_keras, model):
    """Cross-entropy on labels; from logits unless the last layer is a softmax."""
    activation = getattr(model.layers[-1], "activation", None)
    from_logits = getattr(activation, "__name__", "") != "softmax"
    return tf_keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), from_logits


def run(request: dict) -> dict:
    import numpy as np

    started = time.monotonic()
    import keras  # Keras 3: loads the user's model (TF_USE_LEGACY_KERAS affects tf.keras only)
    import tensorflow_model_optimization as tfmot
    import tf_keras

    keras.utils.set_random_seed(int(request.get("seed", 0)))
    tf_keras.utils.set_random_seed(int(request.get("seed", 0)))
    model = keras.saving.load_model(request["model"], safe_mode=True, compile=False)
    twin = rebuild(model)
    train = np.load(request["train"], allow_pickle=False)
    x, labels = train[request["input"]], train["labels"].astype(np.int64)
    probe = x[:64]
    expected, got = np.asarray(model(probe, training=False)), twin(probe, training=False).numpy()
    error = float(np.max(np.abs(expected - got)) / max(float(np.max(np.abs(expected))), 1e-12))
    if error > REBUILD_TOLERANCE:
        raise Refused(f"the Keras 2 rebuild does not reproduce the model (relative max |error| {error:.3g})")
    quantized = tfmot.quantization.keras.quantize_model(twin)
    ranges_set = init_ranges(quantized, twin, x[: int(request.get("calibration_samples", 300))])
    loss, from_logits = _loss(tf_keras, twin)
    quantized.compile(optimizer=tf_keras.optimizers.Adam(float(request["lr"])), loss=loss, metrics=["accuracy"])
    history = quantized.fit(x, labels, epochs=int(request["epochs"]), batch_size=int(request["batch_size"]),
                            shuffle=True, verbose=0)
    quantized.save(request["output"], save_format="tf", include_optimizer=False)
    return {"ok": True, "seconds": time.monotonic() - started, "rebuild_relative_error": error,
            "layers": len(twin.layers), "samples": int(len(x)), "ranges_initialized": ranges_set, "from_logits": from_logits,
            "loss": [float(v) for v in history.history["loss"]],
            "accuracy": [float(v) for v in history.history.get("accuracy", [])],
            "versions": {"tf_keras": tf_keras.__version__, "tensorflow_model_optimization": tfmot.__version__}}


def main() -> None:
    try:
        result = run(json.loads(sys.stdin.read()))
    except Refused as exc:
        result = {"ok": False, "error": str(exc)}
    except Exception as exc:  # a failure in TensorFlow or tfmot: one line for the user, the rest for the log
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                  "traceback": traceback.format_exc()}
    sys.stdout.write("\nEDGEQ-QAT-RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
