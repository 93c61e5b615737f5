"""``edgeq convert``: a model -> an INT8/FP16/FP32 artifact for a device profile, validated on the host."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.names import PRECISIONS as PRECISION_CHOICES
from edgeq.names import format_names

METHOD_CHOICES = ("minmax", "entropy", "percentile")
IO_CHOICES = ("int8", "uint8", "float32")


def _size(num: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num} B"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _input_shapes(ctx, param, values: tuple[str, ...]) -> dict[str | None, tuple[int, ...]]:
    from edgeq.convert.shapes import parse_input_shape
    from edgeq.errors import ConversionError

    shapes: dict[str | None, tuple[int, ...]] = {}
    for value in values:
        try:
            name, dims = parse_input_shape(value)
        except ConversionError as exc:
            raise click.BadParameter(exc.message.removeprefix("--input-shape ")) from None
        if name in shapes:
            raise click.BadParameter(f"{name or 'the input'} is given twice")
        shapes[name] = dims
    return shapes


metric_option = click.option(
    "--metric", "metrics", multiple=True, metavar="NAME",
    help="Also compute this metric against the FP32 source (repeatable): top1, top5, cosine, nmse, "
         "embedding[=OUTPUT] (mask-aware mean pooling of a token output), or MODULE:FUNCTION / FILE.py:FUNCTION "
         "(your own, run here, called with references=, outputs=, inputs=, labels=). Needs --eval.")
gate_option = click.option(
    "--gate", "gates", multiple=True, metavar="METRIC[.FIELD]>=X",
    help="Fail validation unless this holds (repeatable; <= too), e.g. 'embedding.cosine_min>=0.98', "
         "'top5<=0.01' (top-5 drop), 'nmse<=0.001'. Computes its metric. Needs --eval.")

input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, callback=_input_shapes, metavar="[NAME=]DxDx...",
    help="Freeze the model's free dims for this input, e.g. images=1x3x640x640 (repeatable; the name may be "
         "left out for a one-input model). OpenVINO artifacts get a free batch frozen to 1 by default.")


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Device profile name (e.g. rpi4) or YAML path.")
@click.option("--format", "fmt", type=click.Choice(format_names()), help="Artifact format [profile's].")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), help="Precision [profile's].")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration .npz (needed for int8).")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=300, show_default=True,
              help="Use at most this many calibration samples (deterministic subsample).")
@click.option("--calibration-method", type=click.Choice(METHOD_CHOICES),
              help="ONNX int8 calibration method [profile's].")
@click.option("--quantized-io", type=click.Choice(IO_CHOICES),
              help="TFLite int8 input/output type [profile's tflite_quantized_io].")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path),
              help="Eval .npz (inputs + optional labels): validate the artifact against the FP32 source.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), default=None,
              help="Fail when top-1 drops more than this fraction (0.01 = 1 point). Needs --eval.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None,
              help="Fail when any output's mean cosine against the FP32 source is below this (e.g. 0.99 for an "
                   "embedding model). Needs --eval.")
@click.option("--activation-bits", type=click.Choice(["8", "16"]), default=None,
              help="int8 activations in 16 bits, weights in 8 (TFLite 16x8, ONNX w8a16): for activation ranges "
                   "8 bits cannot hold; slower on CPUs (few 16-bit kernels). Default 8.")
@click.option("--transformer", is_flag=True, default=None,
              help="OpenVINO int8: quantize as a transformer (NNCF model_type TRANSFORMER: SmoothQuant, attention "
                   "patterns kept float) - static INT8 for BERT-style models, next to --precision dynamic.")
@metric_option
@gate_option
@input_shape_option
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Artifact directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
def convert(model: Path, profile_name: str, fmt: str | None, precision: str | None, calibration: Path | None,
            calibration_samples: int, calibration_method: str | None, quantized_io: str | None,
            eval_path: Path | None, max_accuracy_drop: float | None, min_cosine: float | None,
            activation_bits: str | None, transformer: bool | None, metrics: tuple[str, ...], gates: tuple[str, ...],
            input_shapes: dict, output: Path, force: bool) -> None:
    """Convert MODEL (.keras/.h5, SavedModel dir or .onnx) into an artifact directory for a device profile."""
    from edgeq.convert import convert as run_convert
    from edgeq.errors import ValidationError
    from edgeq.manifest import read_manifest
    from edgeq.profiles import load_profile

    if max_accuracy_drop is not None and eval_path is None:
        raise click.UsageError("--max-accuracy-drop needs --eval data to measure the drop")
    if min_cosine is not None and eval_path is None:
        raise click.UsageError("--min-cosine needs --eval data to measure the agreement")
    if (metrics or gates) and eval_path is None:
        raise click.UsageError("--metric and --gate need --eval data to measure on")
    profile = load_profile(profile_name)
    try:
        manifest = run_convert(model, profile, output, format=fmt, precision=precision, calibration=calibration,
                               calibration_samples=calibration_samples, calibration_method=calibration_method,
                               quantized_io=quantized_io, eval_path=eval_path,
                               max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine, metrics=metrics,
                               gates=gates, input_shapes=input_shapes, transformer=transformer or None,
                               activation_bits=int(activation_bits) if activation_bits else None, force=force)
    except ValidationError:
        _summary(read_manifest(output), output)
        raise
    _summary(manifest, output)


def _summary(manifest, output: Path) -> None:
    click.echo(f"artifact  {output}  id {manifest.id}  ({manifest.format} {manifest.precision}, "
               f"profile {manifest.profile.get('name')}, {manifest.conversion_seconds:.1f}s)")
    for entry in manifest.files:
        click.echo(f"  {entry.path:<24} {_size(entry.size):>10}")
    for spec in manifest.inputs:
        quant = f" scale={spec.scale:.6g} zero_point={spec.zero_point}" if spec.scale is not None else ""
        click.echo(f"  input  {spec.name} {spec.shape} {spec.dtype}{quant}")
    if manifest.options.get("input_shapes_from"):
        click.echo(f"  shapes      {manifest.options['input_shapes_from']}")
    if manifest.calibration:
        cal = manifest.calibration
        click.echo(f"  calibration  {cal.samples_used}/{cal.samples_available} samples, {cal.method}")
    if manifest.options.get("activation_bits", 8) != 8:
        click.echo(f"  activations {manifest.options['activation_bits']}-bit (weights 8-bit)")
    val = manifest.validation
    if val.status == "not-run":
        click.echo("  validation  not run (pass --eval to compare with the FP32 source)")
    else:
        accuracy = ""
        if val.top1 is not None:
            accuracy = (f"top-1 {_pct(val.top1)} vs fp32 {_pct(val.top1_reference)} "
                        f"(drop {val.top1_drop * 100:+.2f} pts), ")
        click.echo(f"  validation  {val.samples} samples: {accuracy}agreement {_pct(val.top1_agreement)}, "
                   f"cosine {val.cosine_similarity:.5f}, max |err| {val.max_abs_error:.4g}")
        for name, each in (val.outputs or {}).items() if len(val.outputs or {}) > 1 else ():
            click.echo(f"  output      {name}: cosine {each.cosine_mean:.5f} (min {each.cosine_min:.5f}), "
                       f"nmse {each.nmse:.3g}")
        for name, fields in (val.metrics or {}).items():
            click.echo(f"  metric      {name}: " + ", ".join(f"{key} {value:.5g}" for key, value in fields.items()))
        for gate in val.gates or ():
            click.echo(f"  gate        {gate}")
        from edgeq.report.model import what_ran

        click.echo(f"  ran         {what_ran(val.execution) or 'not recorded'}")
        if val.host_caveat:
            click.echo(f"  caveat      {val.host_caveat}")
    click.echo(f"status    {manifest.status}")
