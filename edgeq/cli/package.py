"""``edgeq package``: a verified artifact packaged for an OTA engine (Mender), for fleets beyond SSH push."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--mender", "mender", is_flag=True, help="Write a Mender module-image artifact (the format offered).")
@click.option("--device-type", "device_types", multiple=True,
              help="Mender device type the artifact installs on (repeatable; required).")
@click.option("--key", type=click.Path(path_type=Path), help="PEM private key to sign the artifact with.")
@click.option("--workdir", default="/var/lib/edgeq", show_default=True,
              help="Where releases live on the device (absolute).")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="Releases kept on the device.")
@click.option("--name", "artifact_name", help="Mender artifact name [edgeq-FORMAT-PRECISION-ID].")
@click.option("--allow-failed", is_flag=True, help="Package an artifact that failed its accuracy validation.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="The .mender file to write.")
def package(artifact: Path, mender: bool, device_types: tuple[str, ...], key: Path | None, workdir: str, keep: int,
            artifact_name: str | None, allow_failed: bool, output: Path) -> None:
    """Package ARTIFACT (a converted artifact directory) for an OTA engine; writes its update module beside it."""
    from edgeq.mender import MODULE_DIR, package_mender

    if not mender:
        raise click.UsageError("choose the package format: --mender (the one offered)")
    made = package_mender(artifact, output, list(device_types), key=key, workdir=workdir, keep=keep,
                          artifact_name=artifact_name, allow_failed=allow_failed)
    click.echo(f"wrote {made.path} ({made.size_bytes / 1e6:.1f} MB): Mender artifact {made.artifact_name}, "
               f"release {made.release_id}, device types {', '.join(made.device_types)}, "
               + ("signed" if made.signed else "unsigned"))
    click.echo(f"update module: {made.module} (install once per device at {MODULE_DIR}/{made.module.name}, "
               "mode 755)")
