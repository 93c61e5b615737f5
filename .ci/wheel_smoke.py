"""Write a tiny real ONNX classifier and its eval data for the installed-wheel check (.ci/wheel-check).

Run by the fresh venv's python, outside the checkout: it needs only numpy and onnx (the [onnx] extra).
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
weights = rng.standard_normal((16, 4)).astype(np.float32)
bias = rng.standard_normal(4).astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"]),
     helper.make_node("Softmax", ["logits"], ["scores"], axis=-1)],
    "wheel_smoke",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
    [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
    initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, str(out / "tiny.onnx"))
x = rng.standard_normal((64, 16)).astype(np.float32)
labels = np.argmax(x @ weights + bias, axis=1).astype(np.int64)
np.savez(out / "eval.npz", x=x, labels=labels)
print(f"wrote {out / 'tiny.onnx'} and {out / 'eval.npz'}")
