"""Device profiles: the shipped ones are valid and realistic; bad files give one-line errors naming file and field."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.errors import ProfileError
from edgeq.profiles import available_profiles, list_profiles, load_profile

SHIPPED = {"rpi4", "rpi5", "jetson-orin-nano", "jetson-nano", "x86-avx2", "x86-avx512-vnni", "x86-amx"}


def test_shipped_profiles_load_and_reflect_their_devices():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) >= SHIPPED
    for name in ("rpi4", "rpi5"):
        assert (profiles[name].arch, profiles[name].format, profiles[name].precision) == ("aarch64", "tflite", "int8")
    assert profiles["rpi5"].power.sensor == "rpi-pmic"
    for name in ("jetson-orin-nano", "jetson-nano"):
        p = profiles[name]
        assert (p.format, p.precision, p.power.sensor) == ("onnx", "fp16", "ina3221")
        assert p.execution_providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        assert p.execution_providers[-1] == "CPUExecutionProvider"
    vnni = profiles["x86-avx512-vnni"]
    assert (vnni.format, vnni.precision, vnni.openvino_device, vnni.power.sensor) == ("openvino", "int8", "CPU", "rapl")
    amx = profiles["x86-amx"]
    assert (amx.format, amx.precision, amx.openvino_device) == ("openvino", "int8", "CPU")
    for p in profiles.values():
        assert p.format in p.runtime_packages


def test_profile_by_path(tmp_path):
    source = available_profiles()["rpi4"]
    copy = tmp_path / "mine.yaml"
    data = yaml.safe_load(source.read_text())
    data["name"] = "mine"
    copy.write_text(yaml.safe_dump(data))
    assert load_profile(str(copy)).name == "mine"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(colour="red"), "colour: unknown field"),
        (lambda d: d.update(precision="int4"), "precision:"),
        (lambda d: d.update(threads=0), "threads:"),
        (lambda d: d["power"].update(sensor="multimeter"), "power.sensor:"),
        (lambda d: d["power"].update(sensor="command"), "power:"),
        (lambda d: d.pop("arch"), "arch: Field required"),
    ],
)
def test_invalid_profile_names_file_and_field(tmp_path, mutate, field):
    data = yaml.safe_load(available_profiles()["rpi5"].read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(str(path))
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(str(tmp_path / "nope.yaml"))


def test_cli_profiles_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(cli, ["profiles", "list"], terminal_width=200)
    assert listed.exit_code == 0
    for name in SHIPPED:
        assert name in listed.output
    shown = runner.invoke(cli, ["profiles", "show", "jetson-orin-nano"])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.output)["execution_providers"][0] == "TensorrtExecutionProvider"


def test_cli_unknown_profile_suggests_close_names():
    result = CliRunner().invoke(cli, ["profiles", "show", "rpi"])
    assert result.exit_code == 1
    assert "error: unknown device profile 'rpi'" in result.stderr
    assert "did you mean 'rpi5' or 'rpi4'?" in result.stderr
    assert "Traceback" not in result.output
