"""One format registry: a format is its host backend (edgeq/convert/<fmt>.py) and its device runtime
(edgeq/device/runtimes/<fmt>.py); every other list of formats is derived from those two."""

from __future__ import annotations

import importlib

import pytest
from pydantic import TypeAdapter, ValidationError

from edgeq.convert import registry
from edgeq.device import runtimes
from edgeq.device.errors import RunnerError
from edgeq.names import Format, format_names


def test_host_backends_and_device_runtimes_name_the_same_formats():
    assert set(registry.backends()) == set(runtimes.formats()) == set(format_names())
    assert format_names() == ("onnx", "openvino", "tflite")


@pytest.mark.parametrize("fmt", format_names())
def test_each_format_declares_both_sides(fmt):
    backend = registry.backend(fmt)
    assert backend.name == fmt and backend.capabilities
    assert {cap.format for cap in backend.capabilities} == {fmt}
    assert all(cap.extra == backend.extra for cap in backend.capabilities)
    assert set(backend.quantized_io_precisions) <= {cap.precision for cap in backend.capabilities}

    module = runtimes.runtime_module(fmt)
    assert fmt == module.FORMAT
    assert module.PROBE_MODULES and all(isinstance(m, str) for m in module.PROBE_MODULES)
    assert callable(module.open) and callable(module.import_runtime)


def test_capability_table_is_the_backends_rows():
    rows = registry.capabilities()
    assert rows == tuple(cap for fmt in format_names() for cap in registry.backend(fmt).capabilities)
    assert len({(c.format, c.precision) for c in rows}) == len(rows)


def test_format_names_are_checked_against_the_registry():
    adapter = TypeAdapter(Format)
    assert adapter.validate_python("onnx") == "onnx"
    with pytest.raises(ValidationError) as info:
        adapter.validate_python("tensorrt")
    assert info.value.errors()[0]["msg"] == "Input should be 'onnx', 'openvino' or 'tflite'"


def test_device_refuses_an_unknown_format_by_name():
    with pytest.raises(RunnerError, match="unknown artifact format 'base'"):
        runtimes.runtime_module("base")  # a module of the package, but not a format
    with pytest.raises(RunnerError, match="unknown artifact format 'tensorrt'.*known: onnx, openvino, tflite"):
        runtimes.runtime_module("tensorrt")


def test_cli_choices_come_from_the_registry():
    convert_cli = importlib.import_module("edgeq.cli.convert")
    option = next(p for p in convert_cli.convert.params if p.name == "fmt")
    assert tuple(option.type.choices) == format_names()
