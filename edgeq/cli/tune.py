"""``edgeq tune``: for a device, the fastest artifact that meets an accuracy budget, measured on the device."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.cli.convert import input_shape_option


def _duration(text: str) -> float:
    """'90', '90s', '20m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a duration (e.g. 90s, 20m, 1h)") from None


class _RichProgress:
    """Tune's stages as rich progress bars on stderr, one bar per stage."""

    def __init__(self, bars):
        self._bars, self._task, self._name = bars, None, ""

    def _finish(self) -> None:
        if self._task is not None:
            done = self._bars.tasks[self._task].completed
            self._bars.update(self._task, total=max(done, 1), completed=max(done, 1), description=self._name)

    def stage(self, name: str, total: int | None = None) -> None:
        self._finish()
        self._name = name
        self._task = self._bars.add_task(name, total=total)

    def step(self, text: str) -> None:
        if self._task is not None:
            self._bars.update(self._task, advance=1, description=f"{self._name}: {text}")


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_name",
              help="The device to measure on, or a group: tuned once per device class (profile) [local].")
@click.option("--profile", "profile_name", help="Device profile [the target's].")
@click.option("-i", "--inventory", type=click.Path(dir_okay=False), help="Targets YAML (default: $EDGEQ_INVENTORY).")
@click.option("--calibration", type=click.Path(path_type=Path), required=True, help="Calibration .npz (int8).")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), required=True,
              help="Eval .npz: inputs, and 'labels' for a top-1 budget.")
@click.option("--max-accuracy-drop", type=float, help="Budget: top-1 drop against FP32, a fraction (0.01 = 1 point).")
@click.option("--min-cosine", type=float,
              help="Budget: mean output cosine against FP32, every output (the worst counts; no labels needed).")
@click.option("--gate", "gates", multiple=True,
              help="Budget: METRIC[.FIELD]>=X or <=X over any --metric (repeatable; all must pass), e.g. "
                   "'embedding>=0.99' or 'my_metrics.py:vad.decision_agreement>=0.98'.")
@click.option("--metric", "metric_specs", multiple=True,
              help="Also compute and report this metric for every candidate (as convert --metric; repeatable).")
@click.option("--objective", type=click.Choice(["latency", "energy", "size"]), default="latency", show_default=True)
@click.option("--format", "formats", multiple=True, help="Only these formats (repeatable) [all the profile allows].")
@click.option("--max-time", default="20m", show_default=True, help="Stop building candidates after this long.")
@click.option("--max-candidates", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--calibration-samples", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs per device bench.")
@input_shape_option
@click.option("--train", type=click.Path(path_type=Path),
              help="Training .npz with labels (Keras models): adds QAT candidates, fine-tuned with simulated int8.")
@click.option("--qat-epochs", type=click.IntRange(min=1), default=3, show_default=True, help="QAT fine-tune epochs.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="DIR for candidates, chosen/, tune.*")
@click.option("--force", is_flag=True, help="Replace a non-empty DIR.")
def tune(model, target_name, profile_name, inventory, calibration, eval_path, max_accuracy_drop, min_cosine, gates,
         metric_specs, objective, formats, max_time, max_candidates, calibration_samples, runs, input_shapes, train, qat_epochs, output,
         force) -> None:
    """Find the fastest artifact of MODEL that meets the accuracy budget on a device, and put it in DIR/chosen
    (for a group: DIR/<profile>/chosen per device class, each measured on the class's first target)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeq.profiles import load_profile
    from edgeq.targets import LOCAL_TARGET, load_inventory, resolve_targets
    from edgeq.taskmetrics import parse_gate
    from edgeq.tune import Budget
    from edgeq.tune import tune as run_tune
    from edgeq.tune.fleet import ClassResult, tune_fleet

    budget = Budget(max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine,
                    gates=tuple(parse_gate(text) for text in gates), metric_specs=tuple(metric_specs))
    targets = resolve_targets(load_inventory(inventory), target_name or LOCAL_TARGET)
    if len(targets) > 1 and profile_name:
        raise click.UsageError("--profile applies to one target; a group is tuned once per profile of its targets")
    options = {"calibration": calibration, "eval_path": eval_path, "budget": budget, "objective": objective,
               "formats": list(formats) or None, "max_time_s": _duration(max_time), "max_candidates": max_candidates,
               "calibration_samples": calibration_samples, "runs": runs, "input_shapes": input_shapes,
               "force": force, "train": train, "qat_epochs": qat_epochs}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bars:
        if len(targets) == 1:
            classes = [ClassResult(targets[0].profile, targets[0], targets, run_tune(
                model, targets[0], load_profile(profile_name or targets[0].profile), output=output,
                progress=_RichProgress(bars), **options))]
        else:
            classes = tune_fleet(model, targets, output=output, progress=_RichProgress(bars), **options)
    for device_class in classes:
        _print_result(device_class.result)
    if len(classes) > 1 or len(targets) > 1:
        plural = "class" if len(classes) == 1 else "classes"
        click.echo(f"\n{target_name}: {len(targets)} targets in {len(classes)} device {plural}")
        for c in classes:
            members = ", ".join(t.name for t in c.members)
            click.echo(f"  {c.profile} ({members}), measured on {c.measured_on.name}: "
                       f"{c.result.chosen.id if c.result.chosen else 'nothing chosen'} -> {c.result.chosen_dir or '-'}")
    if any(c.result.chosen is None for c in classes):
        raise SystemExit(1)


def _print_result(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgeq.tune.output import COLUMNS, row

    table = Table(title=f"tune on {result.target} (profile {result.profile}), {result.budget.describe()}")
    for column in COLUMNS:
        if column == "host metric":  # an error can be long: cut here (whole in tune.json / .html), not the rest
            table.add_column(column, no_wrap=True, max_width=72, overflow="ellipsis")
        else:
            table.add_column(column, no_wrap=column == "candidate",
                             min_width=max((len(c.id) for c in result.candidates), default=0)
                             if column == "candidate" else None)
    for candidate in result.candidates:
        table.add_row(*row(candidate), style="bold green" if candidate.chosen else None)
    Console(width=max(Console().width, 200)).print(table)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.chosen is None:
        click.secho(f"error: {result.reason}", fg="red", err=True)
        return
    click.echo(f"chosen: {result.reason}")
    if result.device_accuracy:
        acc = result.device_accuracy
        parts = [f"{k} {acc[k]:.4f}" for k in ("top1", "top1_drop", "top1_agreement") if acc.get(k) is not None]
        parts += [f"{name} " + ", ".join(f"{k} {v:.4g}" for k, v in fields.items())
                  for name, fields in (acc.get("metrics") or {}).items()]
        click.echo(f"on {result.target}: " + (", ".join(parts) or "accuracy not available"))
    click.echo(f"wrote {result.chosen_dir}, {result.output / 'tune.json'}, {result.output / 'tune.html'}")
