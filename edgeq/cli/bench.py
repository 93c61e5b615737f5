"""``edgeq bench``: measure an artifact on a target or a group with the on-device runner."""

from __future__ import annotations

import click


def _fmt(value, spec: str = ".3f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def print_results(runs: list) -> None:
    """The per-target table (stdout), then one error line per failed target (stderr), then the files."""
    from rich.console import Console
    from rich.table import Table

    from edgeq.report.model import what_ran

    table = Table("target", "status", "ran", "p50 ms", "p99 ms", "cv", "ips", "top1", "drop", "peak MB", "power",
                  "mJ/inf", "note")
    for run in runs:
        r = run.result
        latency, accuracy, power, memory = r.latency_ms, r.accuracy, r.power, r.memory_mb
        energy = r.energy_j_per_inference
        if power is not None and power.available:
            power_cell = f"{_fmt(power.avg_w, '.2f')} W ({power.sensor})"
        else:
            power_cell = f"n/a ({power.sensor})" if power is not None else "-"
        note = "EMULATED: latency meaningless" if r.env.get("emulated") else ""
        status = "[green]ok[/]" if run.ok else f"[red]failed ({r.failure.kind})[/]" if r.failure else "[red]failed[/]"
        ran = what_ran(r.runtime.execution if r.runtime else None) or "-"
        table.add_row(r.target, status, ran, _fmt(latency and latency.p50), _fmt(latency and latency.p99),
                      _fmt(latency and latency.cv, ".2f"), _fmt(r.throughput_ips, ".1f"),
                      _fmt(accuracy and accuracy.top1, ".4f"), _fmt(accuracy and accuracy.top1_drop, "+.4f"),
                      _fmt(memory and memory.peak_rss, ".1f"), power_cell,
                      _fmt(energy * 1000 if energy is not None else None, ".4f"), note)
    Console(width=max(Console().width, 150)).print(table)
    for run in runs:
        r = run.result
        if not run.ok:
            click.secho(f"error: {r.error}", fg="red", err=True)
            if r.hint:
                click.echo(f"hint: {r.hint}", err=True)
        elif r.power is not None and r.power.available is False and r.settings.get("power"):
            click.echo(f"note: {r.target}: no power figures: {r.power.reason}", err=True)
        if run.ok and r.accuracy is not None:
            for name, fields in (r.accuracy.metrics or {}).items():
                click.echo(f"{r.target}: metric {name}: " + ", ".join(f"{k} {v:.5g}" for k, v in fields.items()))
    for run in runs:
        click.echo(f"wrote {run.path}")


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
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Also compute this metric on the device's outputs against the FP32 source (repeatable): top1, "
                   "top5, cosine, nmse, embedding[=OUTPUT], or MODULE:FUNCTION / FILE.py:FUNCTION (run here). "
                   "Needs --eval.")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False), required=True,
              help="RESULTS_DIR: one <target>__<artifact-id>.json per target.")
def bench(artifact_dir, target_name, inventory, eval_path, warmup, runs, min_seconds, threads, power,
          idle_seconds, timeout_s, parallel, metrics, output_dir) -> None:
    """Benchmark ARTIFACT_DIR on a target or group: latency, accuracy, memory, power, on the device."""
    from edgeq.bench import bench_fleet
    from edgeq.targets import load_inventory, resolve_targets
    from edgeq.taskmetrics import metrics_for

    if metrics and eval_path is None:
        raise click.UsageError("--metric needs --eval data to measure on")
    task_metrics = metrics_for(list(metrics), [])  # a user metric imports now: a typo fails before any run
    targets = resolve_targets(load_inventory(inventory), target_name)
    runs_done = bench_fleet(artifact_dir, targets, parallel=parallel, eval_path=eval_path, warmup=warmup, runs=runs,
                          min_seconds=min_seconds, threads=threads, power=power, output_dir=output_dir,
                          idle_seconds=idle_seconds, timeout_s=timeout_s, metrics=task_metrics)
    print_results(runs_done)
    if not all(run.ok for run in runs_done):
        raise SystemExit(1)
