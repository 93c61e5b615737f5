"""``edgeq profiles``: list and show device profiles."""

from __future__ import annotations

import click


@click.group()
def profiles() -> None:
    """Device profiles: what to build for each class of device."""


@profiles.command("list")
def list_command() -> None:
    """List the available device profiles."""
    from rich.console import Console
    from rich.table import Table

    from edgeq.profiles import list_profiles

    table = Table()
    for column in ("name", "arch", "format", "precision", "threads", "power"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")
    for p in list_profiles():
        table.add_row(p.name, p.arch, p.format, p.precision, str(p.threads), p.power.sensor, p.description)
    Console().print(table)


@profiles.command("show")
@click.argument("name")
def show_command(name: str) -> None:
    """Show one profile (by name or path) as YAML, validated."""
    import yaml

    from edgeq.profiles import load_profile

    profile = load_profile(name)
    click.echo(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False), nl=False)
