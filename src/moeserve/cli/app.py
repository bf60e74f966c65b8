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
    from moeserve.cli import bench, export, finetune, inspect, plan, profile, serve, trace  # noqa: F401


_register()


def _usage_error_line(exc: Exception) -> str:
    """One line for a usage error (unknown option, bad value, missing argument), with where help is."""
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "moeserve"
    message = " ".join(exc.format_message().split())
    return f"{command}: error: {message} (see '{command} --help')"


def main() -> None:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    debug = os.environ.get("MOESERVE_DEBUG") == "1"
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("moeserve: aborted", file=sys.stderr)
        sys.exit(1)
    except MoeServeError as exc:
        if debug:
            raise
        print(f"moeserve: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("moeserve: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # click's usage errors (vendored by typer): no rich box, one line
        if debug:
            raise
        if exc.format_message().strip():  # empty: a command given no arguments printed its help
            print(_usage_error_line(exc), file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
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
    sys.exit(code if isinstance(code, int) else 0)
