"""ONNX model files as edgeq reads them: external data checked to stay inside the model's own folder before
onnx or onnxruntime opens it, and a content digest that covers the external data files too."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from edgeq.errors import ConversionError, require_backend
from edgeq.errors import first_line as _first_line
from edgeq.manifest import sha256_file


def onnx_sha256(path: Path, external: list[str]) -> str:
    """The model file's sha256; with external data, a digest of it and of each data file (by location)."""
    if not external:
        return sha256_file(path)
    digest = hashlib.sha256(sha256_file(path).encode() + b"\n")
    for location in external:
        digest.update(location.encode() + b"\0" + sha256_file(path.parent / location).encode() + b"\n")
    return digest.hexdigest()


# The keys of a tensor's external_data entries that the ONNX spec defines.
_EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def load_onnx_model(path: Path):
    """The ONNX model at ``path`` with its external data, after checking that data stays in the model's folder."""
    onnx = require_backend("onnx", "onnx")
    model = read_onnx(onnx, path)
    if check_external_data(path, model):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # OSError, ValueError (bounds), onnx's own path checks
            raise ConversionError(f"{path}: cannot read the model's external data ({_first_line(exc)})") from exc
    return model


def read_onnx(onnx, path: Path):
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError: the file is not a readable ONNX model
        raise ConversionError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from exc


def check_external_data(path: Path, model) -> list[str]:
    """Refuse tensors whose external data is not a plain file inside the model's own folder; their locations.

    ``location`` must be relative and resolve (symlinks followed) inside the folder of ``path``, to an
    existing regular file with a single link, with integer offset/length within it. ConversionError names
    the model file and the tensor.
    """
    folder = os.path.realpath(path.parent)
    locations: set[str] = set()
    for tensor in _all_tensors(model):
        if not len(tensor.external_data) and tensor.data_location != tensor.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}

        def refuse(why: str, tensor=tensor) -> ConversionError:
            return ConversionError(f"{path}: tensor '{tensor.name}': external data {why}",
                                   hint="keep a model's external data files in the model's own folder")

        unknown = sorted(set(entries) - _EXTERNAL_DATA_KEYS)
        location = entries.get("location", "")
        if unknown:
            raise refuse(f"has unknown key(s) {unknown[:5]}")
        if not location or os.path.isabs(location) or os.path.splitdrive(location)[0] or "\0" in location:
            raise refuse(f"location {location!r} is not a relative path inside the model's folder")
        real = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([folder, real]) != folder:
            raise refuse(f"location {location!r} points outside the model's folder ({real})")
        try:
            info = os.stat(real)
        except OSError as exc:
            raise refuse(f"file {location!r} cannot be read ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"file {location!r} is not a regular file")
        if info.st_nlink > 1:
            raise refuse(f"file {location!r} has other hard links (it may be a file from elsewhere)")
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0))
        except ValueError as exc:
            raise refuse("has a non-integer offset or length") from exc
        if offset < 0 or length < 0 or offset + length > info.st_size:
            raise refuse(f"offset {offset} + length {length} is outside {location!r} ({info.st_size} bytes)")
        locations.add(os.path.relpath(real, folder))
    return sorted(locations)


def onnx_graphs(graph):
    """``graph`` and every graph nested in it (If, Loop and Scan bodies), each once. A graph's bodies are found
    before it is yielded, so the caller may remove nodes of it in place (not rebuild its node list: that
    would copy the nodes holding the bodies)."""
    pending = [graph]
    while pending:
        current = pending.pop()
        for node in current.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    pending.append(attribute.g)
                pending.extend(attribute.graphs)
        yield current


def _all_tensors(model):
    """Every TensorProto of ``model``: initializers, sparse initializers, attributes, subgraphs and functions."""
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for sparse in attribute.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)


def separate_consumed_outputs(onnx, model) -> int:
    """Give each graph output that nodes of the graph also read an Identity of its own: the nodes read the
    producer's tensor, the output is the Identity's. Returns how many were separated.

    onnxconverter-common's fp16 conversion with ``keep_io_types`` casts such an output back to float32 under
    its own name, so the nodes that read it get float32 where their outputs are declared float16, and ORT
    refuses the model ("Type (tensor(float16)) of output arg ... does not match expected type
    (tensor(float))"). Basic Pitch's ``contour`` is an output and the ``note`` branch's input."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    produced = {name for node in graph.node for name in node.output}
    separated = 0
    for output in graph.output:
        if output.name not in read or output.name not in produced:  # an input passed through: nothing to cast
            continue
        internal = f"{output.name}__edgeq_internal"
        for node in graph.node:
            node.output[:] = [internal if name == output.name else name for name in node.output]
            node.input[:] = [internal if name == output.name else name for name in node.input]
        graph.node.append(onnx.helper.make_node("Identity", [internal], [output.name],
                                                name=f"{output.name}__edgeq_output"))
        separated += 1
    return separated
