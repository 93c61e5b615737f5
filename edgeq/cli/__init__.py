"""The ``edgeq`` command line: a thin layer over the library.

Each command lives in its own module and imports the library (and any heavy
backend) inside the command function, so ``edgeq --help`` stays fast. Library
errors (``EdgeqError``) are caught here once and printed as one line plus a
hint; usage errors exit 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from edgeq import __version__
from edgeq.errors import EdgeqError

# command name -> "module:attribute"; modules are imported when the command is looked up.
COMMANDS = {
    "profiles": "edgeq.cli.profiles:profiles",
    "convert": "edgeq.cli.convert:convert",
    "targets": "edgeq.cli.targets:targets",
    "deploy": "edgeq.cli.deploy:deploy",
    "rollback": "edgeq.cli.deploy:rollback",
    "bench": "edgeq.cli.bench:bench",
    "report": "edgeq.cli.report:report",
    "lab": "edgeq.cli.lab:lab",
    "tune": "edgeq.cli.tune:tune",
    "qat": "edgeq.cli.qat:qat",
    "package": "edgeq.cli.package:package",
}


class UserError(click.ClickException):
    """An EdgeqError shown as ``error: message`` and ``hint: ...`` with exit code 1."""

    exit_code = 1

    def __init__(self, error: EdgeqError):
        super().__init__(error.message)
        self.hint = error.hint

    def show(self, file=None) -> None:
        file = file or sys.stderr
        click.secho(f"error: {self.message}", fg="red", err=True, file=file)
        if self.hint:
            click.echo(f"hint: {self.hint}", err=True, file=file)


class EdgeqGroup(click.Group):
    """A group whose commands load lazily and whose library errors become one-line messages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeqError as exc:
            raise UserError(exc) from exc


@click.group(cls=EdgeqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeq")
@click.option("-v", "--verbose", count=True,
              help="More log output on stderr (-v info, -vv debug and the backends' own info lines).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """edgeq: convert, quantize, deploy and benchmark ML models on edge devices."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # TensorFlow's C++ logs drown the useful lines; keep them quiet unless asked for.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if verbose < 2 else "0")
    if verbose < 2:
        from edgeq.quiet import filtered_stderr

        ctx.with_resource(filtered_stderr())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="edgeq")
