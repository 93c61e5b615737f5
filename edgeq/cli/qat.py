"""``edgeq qat``: quantization-aware training of a Keras or PyTorch model, its int8 artifacts, and the PTQ
comparison."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Device profile name or YAML path.")
@click.option("--train", "train", type=click.Path(path_type=Path), required=True,
              help="Training .npz: the input array and 'labels' (class ids).")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), required=True,
              help="Eval .npz with 'labels': every artifact's top-1 is measured on it.")
@click.option("--format", "formats", multiple=True, type=click.Choice(["tflite", "onnx", "openvino"]),
              help="Formats to build (repeatable) [all three; onnx and openvino for a .pt2].")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Adam learning rate of the fine-tune.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="New or empty directory.")
def qat(model: Path, profile_name: str, train: Path, eval_path: Path, formats: tuple[str, ...], epochs: int,
        lr: float, batch_size: int, output: Path) -> None:
    """Fine-tune MODEL (.keras/.h5 or .pt2) with simulated INT8 rounding; build its int8 artifacts; compare
    with PTQ."""
    from edgeq.profiles import load_profile
    from edgeq.qat import qat as run_qat
    from edgeq.qat import table_lines

    result = run_qat(model, load_profile(profile_name), train=train, eval_path=eval_path, output=output,
                     formats=list(formats) or None, epochs=epochs, lr=lr, batch_size=batch_size)
    for line in table_lines(result):
        click.echo(line)
    click.echo(f"wrote {output / 'qat.json'} and {output / 'qat.md'}; QAT artifacts in {output}/qat-<format>/")
