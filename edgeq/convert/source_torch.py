"""PyTorch sources: ``.pt2`` files written by ``torch.export.save`` (kind ``pytorch``, an ExportedProgram that
loads without the model's class code) and TorchScript ``.pt`` files (kind ``torchscript``, legacy). A
state_dict or a pickled module (``torch.save``) is refused: it needs the class code, and unpickling runs code.

Both kinds are code-bearing formats (a .pt2's graph names operators, a TorchScript file carries TorchScript
code), so they must come from a trusted source. Within that, edgeq closes what would run Python from the
file: a .pt2 whose payloads are pickled (``use_pickle``, custom or opaque objects, legacy weight files) is
refused before torch reads it, and every ``torch.load`` the loader makes is forced to ``weights_only``.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from edgeq.data import InputSpec
from edgeq.errors import ConversionError, require_backend
from edgeq.errors import first_line as _first_line

PT2_SUFFIXES = (".pt2",)
TORCHSCRIPT_SUFFIXES = (".pt",)
PICKLE_SUFFIXES = (".pth", ".bin", ".ckpt", ".pkl", ".pickle")
EXPORT_HINT = "export it with torch.export.save(torch.export.export(model.eval(), example_inputs), 'model.pt2')"


def refuse_pickle(path: Path) -> ConversionError:
    return ConversionError(f"{path}: refused: a PyTorch state_dict or pickled module (torch.save) needs the "
                           "model's class code to load, and unpickling it runs code", hint=EXPORT_HINT)


def torch_kind(path: Path) -> str:
    """``pytorch`` or ``torchscript`` for a PyTorch file, after looking inside it; a refusal otherwise."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if not zipfile.is_zipfile(path):
        if suffix in PT2_SUFFIXES:
            raise ConversionError(f"{path}: not a .pt2 archive (torch.export.save writes a zip file)")
        raise refuse_pickle(path)  # torch.save's legacy (non-zip) format is a bare pickle
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if suffix in PT2_SUFFIXES:
        return "pytorch"
    if any("/code/" in name for name in names) and any(name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    raise refuse_pickle(path)  # a torch.save zip: data.pkl without TorchScript code


def check_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 whose payloads torch would unpickle with ``weights_only=False`` or ``pickle.loads``."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        configs = [n for n in names if n.endswith("_config.json") and ("/data/weights/" in n or "/data/constants/" in n)]
        if not any("/models/" in n and n.endswith(".json") for n in names):
            raise ConversionError(f"{path}: not a torch.export archive (no models/*.json)", hint=EXPORT_HINT)
        for name in names:
            leaf = name.rsplit("/", 1)[-1]
            if ("/data/weights/" in name or "/data/constants/" in name) and leaf.endswith(".pt"):
                raise _refuse_pt2(path, f"{name} is a pickled payload of the legacy format")
            if "/data/constants/" in name and leaf.startswith(("custom_obj", "opaque")):
                raise _refuse_pt2(path, f"{name} is a pickled custom object")
        for name in configs:
            try:
                entries = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError) as exc:
                raise ConversionError(f"{path}: {name} is not a valid payload config ({exc})") from exc
            for fqn, meta in entries.items():
                if not isinstance(meta, dict) or meta.get("use_pickle"):
                    raise _refuse_pt2(path, f"payload '{fqn}' is pickled")


def _refuse_pt2(path: Path, why: str) -> ConversionError:
    return ConversionError(f"{path}: refused: {why}, and unpickling runs code",
                           hint="export the model again with plain tensor weights (torch.export.save)")


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load in the block is weights_only, whatever its caller asks (torch reads the variable at
    each call): a payload that is more than tensors fails instead of running."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _numpy_dtype(torch_dtype) -> str:
    return str(torch_dtype).removeprefix("torch.")


def load_exported(path: Path):
    """(ExportedProgram, inputs, output names) of a .pt2 file."""
    torch = require_backend("torch", "torch")
    check_pt2_archive(path)
    try:
        with _weights_only_loads():
            program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        raise ConversionError(f"{path}: cannot load the exported program ({_first_line(exc)})",
                              hint=EXPORT_HINT) from exc
    signature = program.graph_signature
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = []
    for name in signature.user_inputs:
        value = placeholders[name].meta.get("val") if name in placeholders else None
        if value is None or not hasattr(value, "shape"):
            raise ConversionError(f"{path}: input '{name}' is not a tensor; edgeq feeds tensors only")
        shape = [int(d) if isinstance(d, int) else None for d in value.shape]  # SymInt: a free dim
        inputs.append(InputSpec(name=name, shape=shape, dtype=_numpy_dtype(value.dtype)))
    return program, inputs, [str(name) for name in signature.user_outputs]


def load_torchscript(path: Path):
    """(ScriptModule, input names) of a TorchScript file; its shapes are not recorded in the file."""
    torch = require_backend("torch", "torch")
    try:
        with _weights_only_loads():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - RuntimeError mostly
        raise ConversionError(f"{path}: cannot load the TorchScript model ({_first_line(exc)})") from exc
    module.eval()
    arguments = [a for a in module.forward.schema.arguments if a.name != "self"]
    if any(str(a.type) != "Tensor" for a in arguments):
        raise ConversionError(f"{path}: TorchScript forward() takes non-tensor arguments "
                              f"({', '.join(f'{a.name}: {a.type}' for a in arguments)})")
    return module, [a.name for a in arguments]


def run_module(module, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """FP32 outputs of a PyTorch module (flattened: a tuple or dict of outputs becomes a list)."""
    torch = require_backend("torch", "torch")
    with torch.no_grad():
        result = module(*[torch.from_numpy(np.ascontiguousarray(feed[name])) for name in names])
    if isinstance(result, dict):
        result = list(result.values())
    elif not isinstance(result, (list, tuple)):
        result = [result]
    return [r.detach().cpu().numpy().astype(np.float32, copy=False) for r in result]


def example_inputs(inputs: list[InputSpec], shapes: dict[str, list[int]]) -> tuple:
    """Zeros of each input's shape (frozen dims, else the recorded ones, a free dim 1): what the exporters trace."""
    torch = require_backend("torch", "torch")
    tensors = []
    for spec in inputs:
        dims = shapes.get(spec.name) or [1 if d is None else d for d in spec.shape]
        tensors.append(torch.zeros(dims, dtype=getattr(torch, spec.dtype)))
    return tuple(tensors)


def export_onnx(source, target: Path, shapes: dict[str, list[int]], opset: int) -> None:
    """``source`` (pytorch or torchscript) as an ONNX file: the dynamo exporter for an ExportedProgram, the
    TorchScript exporter for a ScriptModule; free dims other than those frozen stay free."""
    torch = require_backend("torch", "torch")
    require_backend("onnxscript", "torch")
    names = [spec.name for spec in source.inputs]
    free = {spec.name: {i: f"{spec.name}_d{i}" for i, d in enumerate(spec.shape) if d is None}
            for spec in source.inputs if spec.name not in shapes}
    args = example_inputs(source.inputs, shapes)
    try:
        if source.kind == "pytorch":
            program = source.exported_program
            if shapes:  # export again at the frozen shapes: the program's own symbols would stay free
                program = torch.export.export(program.module(), args)
            torch.onnx.export(program, args, f=str(target), dynamo=True, opset_version=max(opset, 18),
                              input_names=names, output_names=source.outputs, verbose=False)
        else:
            torch.onnx.export(source.torch_module, args, str(target), dynamo=False, opset_version=opset,
                              input_names=names, output_names=source.outputs,
                              dynamic_axes={n: axes for n, axes in free.items() if axes} or None)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types
        raise ConversionError(f"{source.path}: cannot export to ONNX ({_first_line(exc)})") from exc
