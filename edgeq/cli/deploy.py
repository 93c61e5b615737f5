"""``edgeq deploy`` and ``edgeq rollback``: releases on one device or a whole fleet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

inventory_option = click.option("-i", "--inventory", type=click.Path(dir_okay=False),
                                help="Targets YAML (default: $EDGEQ_INVENTORY, else targets/*.yaml).")
target_option = click.option("-t", "--target", "target_name", required=True, help="A target or a group.")

# Uploads smaller than this finish before a progress bar would be useful.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


def _seconds(value: float) -> str:
    return f"{value:.1f}"


def print_error(message: str, hint: str | None = None) -> None:
    """``error: ...`` (+ ``hint: ...``) on stderr, as the CLI prints an EdgeqError."""
    click.secho(f"error: {message}", fg="red", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


def run_per_target(targets: list, action: Callable[[Any], Any], report: Callable[[Any, Any], None]) -> None:
    """``report(target, action(target))`` for each target, in order.

    With one target its EdgeqError propagates (the CLI prints it once and exits 1). With several, a failing
    target's error and hint are printed and the others still run; then exit 1 if any failed.
    """
    from edgeq.errors import EdgeqError

    failed = 0
    for target in targets:
        try:
            result = action(target)
        except EdgeqError as exc:
            if len(targets) == 1:
                raise
            failed += 1
            print_error(exc.message, exc.hint)
            continue
        report(target, result)
    if failed:
        raise SystemExit(1)


def print_outcomes(outcomes) -> None:
    """The per-target table (stdout), then one error line + hint per failed target (stderr)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("target", "result", "release", "seconds", "details")
    styles = {"deployed": "green", "unchanged": "cyan", "failed": "red", "skipped": "yellow"}
    for o in outcomes:
        table.add_row(o.target.name, f"[{styles[o.status]}]{o.status}[/]", o.release_id or "-",
                      _seconds(o.seconds), o.error or o.message, )
    Console(width=max(Console().width, 140)).print(table)
    for o in outcomes:
        if o.status == "failed":
            print_error(o.error, o.hint)


@click.command()
@click.argument("artifact_dir", type=click.Path(file_okay=False))
@target_option
@inventory_option
@click.option("--parallel", type=click.IntRange(min=1), default=8, show_default=True,
              help="Deploy to at most this many targets at once.")
@click.option("--canary", type=click.IntRange(min=0), default=0, show_default=True,
              help="Deploy to the first N targets first; stop if any of them fails.")
@click.option("--max-fail-percent", type=click.FloatRange(0, 100), default=None,
              help="Skip the remaining batches once more than this share of targets failed.")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="Releases kept on each device (the current and previous one always stay).")
@click.option("--allow-failed", is_flag=True, help="Deploy an artifact whose accuracy validation failed.")
def deploy(artifact_dir, target_name, inventory, parallel, canary, max_fail_percent, keep, allow_failed) -> None:
    """Deploy ARTIFACT_DIR to a target or group: verified on the device, activated atomically."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgeq.deploy import check_artifact, deploy_fleet
    from edgeq.targets import load_inventory, resolve_targets

    targets = resolve_targets(load_inventory(inventory), target_name)
    _manifest, plan = check_artifact(artifact_dir, allow_failed)
    total = sum(f.size for f in plan)
    console = Console(stderr=True)
    show = console.is_terminal and total >= PROGRESS_MIN_BYTES
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True, disable=not show) as bars:
        tasks: dict[str, int] = {}

        def progress(target, done: int, size: int) -> None:
            if target.name not in tasks:
                tasks[target.name] = bars.add_task(target.name, total=size)
            bars.update(tasks[target.name], completed=done, total=size)

        outcomes = deploy_fleet(artifact_dir, targets, parallel=parallel, canary=canary,
                                max_fail_percent=max_fail_percent, keep=keep, progress=progress,
                                allow_failed=allow_failed)
    print_outcomes(outcomes)
    if not all(o.ok for o in outcomes):
        raise SystemExit(1)


@click.command()
@target_option
@inventory_option
def rollback(target_name, inventory) -> None:
    """Point each target's ``current`` back at its previous release."""
    from edgeq.deploy import rollback as rollback_target
    from edgeq.targets import load_inventory, resolve_targets

    run_per_target(resolve_targets(load_inventory(inventory), target_name), rollback_target,
                   lambda target, result: click.echo(f"{target.name}: current {result.from_id} -> {result.to_id}"))
