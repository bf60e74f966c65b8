"""The `moeserve` command: a thin Typer app; each subcommand lives in its own module."""

from __future__ import annotations

import os
import sys

import typer

from moeserve import __version__
from moeserve.errors import MoeServeError

app = typer.Typer(
    name="moeserve",
    help="Make Mixture-of-Experts LLMs cheap and fast to serve when GPU memory or money is short.\n\n"
    "Example: moeserve inspect demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moeserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """moeserve: profile, plan, fine-tune and serve MoE models."""


def _register() -> None:
    # Each module adds its command to `app`; a command is registered only once it works.
    from moeserve.cli import bench, finetune, inspect, plan, profile, serve, trace  # noqa: F401


_register()


def main() -> None:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    debug = os.environ.get("MOESERVE_DEBUG") == "1"
    try:
        app()
    except MoeServeError as exc:
        if debug:
            raise
        print(f"moeserve: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("moeserve: interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError) as exc:
        if debug:
            raise
        print(f"moeserve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # a bug: keep it to one line unless asked for the traceback
        if debug:
            raise
        print(f"moeserve: internal error: {type(exc).__name__}: {exc} (MOESERVE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)
