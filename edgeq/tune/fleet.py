"""Tune a fleet once per device class: targets that share a profile run the same artifact, so one device of
each profile is measured (the first in the group) and its choice holds for the class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeq.profiles import load_profile
from edgeq.targets import Target
from edgeq.tune.search import TuneResult, tune


@dataclass
class ClassResult:
    profile: str
    measured_on: Target
    members: list[Target]  # every target of the class, the measured one included
    result: TuneResult


def device_classes(targets: list[Target]) -> dict[str, list[Target]]:
    """profile name -> its targets, in the group's order."""
    classes: dict[str, list[Target]] = {}
    for target in targets:
        classes.setdefault(target.profile, []).append(target)
    return classes


def tune_fleet(model: Path | str, targets: list[Target], *, output: Path | str, **options) -> list[ClassResult]:
    """``tune`` once per device class into ``output/<profile>/``; ``options`` as for ``tune``."""
    results = []
    for profile_name, members in device_classes(targets).items():
        profile = load_profile(profile_name)
        result = tune(model, members[0], profile, output=Path(output) / profile.name, **options)
        results.append(ClassResult(profile.name, members[0], members, result))
    return results
