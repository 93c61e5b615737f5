"""Which formats a tune may try on a device: those its profile allows and edgeq can build from the source,
less those whose runtime the device lacks (asked of the device first)."""

from __future__ import annotations

from edgeq import devicecheck
from edgeq.errors import TuneError
from edgeq.profiles import DeviceProfile
from edgeq.targets import Target
from edgeq.tune.candidates import buildable


def allowed_formats(profile: DeviceProfile, source_kind: str, wanted: list[str] | None) -> list[str]:
    """The formats tune may use: those the profile's device can run (its ``runtime_packages``), its own
    format first, that edgeq can build from this kind of source."""
    allowed = devicecheck.allowed_formats(profile)
    for fmt in wanted or []:
        if fmt not in allowed:
            raise TuneError(f"profile '{profile.name}' does not allow format '{fmt}' (it allows "
                            f"{', '.join(allowed)})", hint="add it to the profile's runtime_packages")
    chosen = [f for f in allowed if (not wanted or f in wanted) and buildable(f, source_kind)]
    if not chosen:
        raise TuneError(f"none of the formats profile '{profile.name}' allows ({', '.join(allowed)}) can be "
                        f"built from a {source_kind} model")
    return chosen


def runnable_formats(target: Target, fmts: list[str], wanted: list[str] | None, notes: list[str]) -> list[str]:
    """``fmts`` less those whose runtime does not import on ``target`` (asked first, so that no candidate is
    built for a runtime the device lacks); a format asked for by name must be there."""
    check = devicecheck.check_target(target)
    if check.failure is not None:
        raise TuneError(check.failure.message, hint=check.failure.hint)
    missing = [f for f in fmts if not check.runtimes.get(f, {}).get("ok")]
    setup = f"edgeq targets setup {target.name}"
    if wanted and missing:
        raise TuneError(f"{target.name}: no {', '.join(missing)} runtime on the device", hint=f"install it: {setup}")
    runnable = [f for f in fmts if f not in missing]
    if not runnable:
        raise TuneError(f"{target.name}: none of the runtimes for {', '.join(fmts)} imports on the device",
                        hint=f"install them: {setup}")
    if missing:
        notes.append(f"{', '.join(missing)} not tried: no runtime on {target.name} (install it: {setup})")
    return runnable
