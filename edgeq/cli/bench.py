"""``edgeq bench``: measure an artifact on a target or a group with the on-device runner."""

from __future__ import annotations

import click


def _fmt(value, spec: str = ".3f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def print_results(results: list[dict]) -> None:
    """The per-target table (stdout), then one error line per failed target (stderr)."""
    from rich.console import Console
    from rich.table import Table

    from edgeq.report.model import what_ran

    table = Table("target", "status", "ran", "p50 ms", "p99 ms", "cv", "ips", "top1", "drop", "peak MB", "power",
                  "mJ/inf", "note")
    for r in results:
        latency = r.get("latency_ms") or {}
        accuracy = r.get("accuracy") or {}
        power = r.get("power") or {}
        energy = r.get("energy_j_per_inference")
        env = r.get("env") or {}
        if power.get("available"):
            power_cell = f"{_fmt(power.get('avg_w'), '.2f')} W ({power.get('sensor')})"
        else:
            power_cell = f"n/a ({power.get('sensor')})" if power else "-"
        note = "EMULATED: latency meaningless" if env.get("emulated") else ""
        status = "[green]ok[/]" if r["status"] == "ok" else "[red]failed[/]"
        ran = what_ran((r.get("runtime") or {}).get("execution")) or "-"
        table.add_row(r["target"], status, ran, _fmt(latency.get("p50")), _fmt(latency.get("p99")),
                      _fmt(latency.get("cv"), ".2f"), _fmt(r.get("throughput_ips"), ".1f"),
                      _fmt(accuracy.get("top1"), ".4f"), _fmt(accuracy.get("top1_drop"), "+.4f"),
                      _fmt((r.get("memory_mb") or {}).get("peak_rss"), ".1f"), power_cell,
                      _fmt(energy * 1000 if energy is not None else None, ".4f"), note)
    Console(width=max(Console().width, 150)).print(table)
    for r in results:
        if r["status"] != "ok":
            click.secho(f"error: {r['error']}", fg="red", err=True)
            if r.get("hint"):
                click.echo(f"hint: {r['hint']}", err=True)
        elif (r.get("power") or {}).get("available") is False and r["settings"].get("power"):
            click.echo(f"note: {r['target']}: no power figures: {r['power'].get('reason')}", err=True)
    for r in results:
        if r.get("result_file"):
            click.echo(f"wrote {r['result_file']}")


@click.command()
@click.argument("artifact_dir", type=click.Path(file_okay=False))
@click.option("-t", "--target", "target_name", required=True, help="A target, a group, or 'local'.")
@click.option("-i", "--inventory", type=click.Path(dir_okay=False),
              help="Targets YAML (default: $EDGEQ_INVENTORY, else targets/*.yaml).")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False),
              help="Eval .npz (inputs + optional 'labels'); labels stay on this machine.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="At least this many timed runs.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Keep timing until this much time has passed too.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Override the profile's thread count.")
@click.option("--power/--no-power", default=True, show_default=True, help="Sample the profile's power sensor.")
@click.option("--idle-seconds", type=click.FloatRange(min=0), default=None,
              help="Idle power sampling before the timed runs (default: the profile's power.idle_seconds).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=None,
              help="Stop the runner on the device after this many seconds (default: from the settings).")
@click.option("--parallel", type=click.IntRange(min=1), default=8, show_default=True,
              help="Benchmark at most this many targets at once.")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False), required=True,
              help="RESULTS_DIR: one <target>__<artifact-id>.json per target.")
def bench(artifact_dir, target_name, inventory, eval_path, warmup, runs, min_seconds, threads, power,
          idle_seconds, timeout_s, parallel, output_dir) -> None:
    """Benchmark ARTIFACT_DIR on a target or group: latency, accuracy, memory, power, on the device."""
    from edgeq.bench import bench_fleet
    from edgeq.targets import load_inventory, resolve_targets

    targets = resolve_targets(load_inventory(inventory), target_name)
    results = bench_fleet(artifact_dir, targets, parallel=parallel, eval_path=eval_path, warmup=warmup, runs=runs,
                          min_seconds=min_seconds, threads=threads, power=power, output_dir=output_dir,
                          idle_seconds=idle_seconds, timeout_s=timeout_s)
    print_results(results)
    if any(r["status"] != "ok" for r in results):
        raise SystemExit(1)
