"""The wheel's package list matches the tree, and profiles are found as package resources, not by path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeq.errors import ProfileError
from edgeq.profiles import PROFILE_PATH_ENV, available_profiles, builtin_profiles, load_profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgeq").rglob("__init__.py")}
    on_disk.add("edgeq.device_profiles")
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {"edgeq.device_profiles": "device_profiles"}


def test_builtin_profiles_are_package_resources():
    names = set(builtin_profiles())
    assert names == {p.stem for p in (ROOT / "device_profiles").glob("*.yaml")}
    assert {"rpi4", "x86-avx2", "x86-amx"} <= names


def test_a_device_profiles_folder_in_the_working_directory_is_not_used(tmp_path, monkeypatch):
    (tmp_path / "device_profiles").mkdir()
    (tmp_path / "device_profiles" / "rpi4.yaml").write_text("name: broken\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PROFILE_PATH_ENV, raising=False)
    assert load_profile("rpi4").name == "rpi4"


def test_user_profiles_from_the_profile_path(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        directory.mkdir()
    source = (ROOT / "device_profiles" / "rpi4.yaml").read_text()
    (first / "lab-pi.yaml").write_text(source.replace("name: rpi4", "name: lab-pi"))
    (second / "lab-pi.yaml").write_text("name: shadowed\n")
    (second / "rpi4.yaml").write_text(source.replace("threads: 4", "threads: 3"))
    monkeypatch.setenv(PROFILE_PATH_ENV, f"{first}:{second}")
    assert load_profile("lab-pi").name == "lab-pi"  # the first directory wins
    assert load_profile("rpi4").threads == 3  # user profiles come before the built-in ones
    assert set(available_profiles()) >= {"lab-pi", "rpi4", "x86-amx"}
    monkeypatch.setenv(PROFILE_PATH_ENV, str(tmp_path / "missing"))
    with pytest.raises(ProfileError, match=f"{PROFILE_PATH_ENV}: .*missing is not a directory"):
        load_profile("rpi4")
