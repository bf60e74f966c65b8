"""nox sessions: tests, lint, bench. Each installs the CPU torch wheel explicitly (see README)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    session.install(TORCH, "-e", ".[dev,ray]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "scripts", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory benchmarks; each reports the machine and its own baseline from the same run."""
    session.install(TORCH, "-e", ".[dev,ray]")
    # each script parses only its own flags; `nox -s bench -- bench_capture` runs one of them
    # (bench_expert_cache: the expert-cache table of docs/expert-cache.md, with a quick router fine-tune first)
    wanted = set(session.posargs)
    for script in sorted(__import__("pathlib").Path("scripts").glob("bench_*.py")):
        if not wanted or script.stem in wanted:
            session.run("python", str(script))
