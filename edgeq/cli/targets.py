"""``edgeq targets``: list, check, trust and set up devices."""

from __future__ import annotations

import click

from edgeq.cli.deploy import inventory_option, print_error, run_per_target
from edgeq.names import format_names


def _targets(inventory, name):
    from edgeq.targets import load_inventory, resolve_targets

    return resolve_targets(load_inventory(inventory), name)


@click.group()
def targets() -> None:
    """Devices to deploy to and benchmark on (targets/*.yaml)."""


@targets.command("list")
@inventory_option
def list_command(inventory) -> None:
    """List the inventory's targets and groups (and the built-in 'local')."""
    from rich.console import Console
    from rich.table import Table

    from edgeq.targets import LOCAL_TARGET, load_inventory

    inv = load_inventory(inventory)
    memberships: dict[str, list[str]] = {}
    for group, members in inv.groups.items():
        for member in members:
            memberships.setdefault(member, []).append(group)
    table = Table("target", "address", "profile", "workdir", "python", "groups", "file")
    for name, target in inv.targets.items():
        table.add_row(name, target.address, target.profile, target.workdir, target.python,
                      ", ".join(memberships.get(name, [])), inv.sources.get(name, ""))
    if LOCAL_TARGET not in inv.targets:
        table.add_row(LOCAL_TARGET, "this machine (built-in)", "detected", "$EDGEQ_LOCAL_WORKDIR or ~/.edgeq/local",
                      "this interpreter", "", "")
    Console(width=max(Console().width, 140)).print(table)


def _size(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.1f} GB"


def _runtime_state(check, fmt: str) -> str:
    probe = check.runtimes[fmt]
    role = "" if fmt in check.allowed_formats else f" (profile {check.target.profile} does not list it)"
    if probe.get("ok"):
        version = f" {probe['version']}" if probe.get("version") else ""
        return f"imports ({probe['module']}{version}){role}"
    if fmt not in check.allowed_formats:
        return "not installed" + role
    return f"does NOT import: {probe.get('error', 'not checked')}"


@targets.command("check")
@click.argument("name")
@inventory_option
def check_command(name, inventory) -> None:
    """Report reachability, host key, arch, OS, Python, free disk, runtimes and power sensors of NAME.

    Exits 1 unless every runtime NAME's profile allows imports there."""
    from edgeq.devicecheck import check_target

    failed = False
    for target in _targets(inventory, name):
        check = check_target(target)
        trusted = {None: "n/a (local)", True: "yes", False: "NO"}[check.host_key_trusted]
        click.echo(f"{target.name} ({target.address})")
        click.echo(f"  reachable:        {'yes' if check.reachable else 'no'}")
        click.echo(f"  host key trusted: {trusted if check.reachable else '-'}")
        if check.arch:
            match = "" if check.arch == check.profile_arch else f"  (profile {target.profile} expects {check.profile_arch})"
            click.echo(f"  arch:             {check.arch}{match}")
            click.echo(f"  os:               {check.os}")
            click.echo(f"  python:           {check.python} ({check.python_path})")
            click.echo(f"  free in workdir:  {_size(check.free_bytes)}")
            for fmt in check.runtimes:
                click.echo(f"  {fmt + ' runtime:':<18}{_runtime_state(check, fmt)}")
            sensors = ", ".join(
                s["sensor"] + ("" if s.get("readable", True) else " (not readable)") for s in check.power_sensors
            ) or "none found"
            click.echo(f"  power sensors:    {sensors}")
        if check.error:
            print_error(check.error, check.hint)
        elif check.missing_formats and check.reachable:
            print_error(f"{target.name}: runtime missing for {', '.join(check.missing_formats)} (profile "
                        f"{target.profile} allows it)", f"install it with: edgeq targets setup {target.name}")
        if not check.ok:
            failed = True
    if failed:
        raise SystemExit(1)


@targets.command("trust")
@click.argument("name")
@inventory_option
@click.option("--fingerprint", "pinned", metavar="SHA256:...",
              help="Accept only the host key with this fingerprint (read on the device); it replaces the host's "
                   "old entries: for re-keying a reinstalled device.")
def trust_command(name, inventory, pinned) -> None:
    """Record NAME's SSH host key(s) after showing the fingerprint (in the target's known_hosts file, else ~/.ssh/known_hosts)."""
    from edgeq.remote.hostkeys import trust_target

    def report(target, result) -> None:
        verb = {"added": "added to", "replaced": f"replaced {result.replaced} old entr"
                f"{'y' if result.replaced == 1 else 'ies'} in"}.get(result.status, "already in")
        click.echo(f"{target.name}: {result.known_hosts_name} {result.key_type} {result.fingerprint} "
                   f"({verb} {result.known_hosts})")

    run_per_target(_targets(inventory, name), lambda target: trust_target(target, pinned=pinned), report)


@targets.command("unlock")
@click.argument("name")
@inventory_option
def unlock_command(name, inventory) -> None:
    """Break NAME's deploy lock when the controller holding it is gone (a partition leaves it for hours).

    Only the device process that is edgeq's lock step is stopped; run it only when no deploy is running."""
    from edgeq.deploy import break_lock

    run_per_target(_targets(inventory, name), break_lock, lambda target, message: click.echo(message))


@targets.command("setup")
@click.argument("name")
@inventory_option
@click.option("--wheelhouse", type=click.Path(file_okay=False, exists=True),
              help="Install from these local .whl files (uploaded; pip --no-index) instead of the device's index.")
@click.option("--system-site-packages", is_flag=True, help="Let the venv see the device's system packages.")
@click.option("--format", "extra_formats", type=click.Choice(format_names()), multiple=True,
              help="Also install this format's runtime, beyond those the profile allows (repeatable).")
@click.option("--only", "only_formats", type=click.Choice(format_names()), multiple=True,
              help="Install only these formats' runtimes (repeatable), e.g. on a device short of space.")
def setup_command(name, inventory, wheelhouse, system_site_packages, extra_formats, only_formats) -> None:
    """Create a venv in the workdir of NAME with the runtime of every format its profile allows.

    The venv is built beside the old one and replaces it only once pip succeeded."""
    from edgeq.devicecheck import setup_target

    def setup(target):
        return setup_target(target, wheelhouse=wheelhouse, system_site_packages=system_site_packages,
                            extra_formats=extra_formats, only_formats=only_formats)

    def report(target, result) -> None:
        click.echo(f"{target.name}: runtimes for {', '.join(result.formats)}: installed {' '.join(result.packages)} "
                   f"from {result.source} into {result.python} ({result.seconds:.0f}s)")

    run_per_target(_targets(inventory, name), setup, report)
