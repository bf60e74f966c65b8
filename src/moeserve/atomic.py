"""Outputs that appear complete or not at all, and never destroy what moeserve did not write.

- A file output is written to a temporary file beside its target and renamed over it; only a file
  (or nothing) may stand at the target: a directory there is refused, never removed.
- A directory output (a fine-tuned model) is built in a temporary directory beside its target; an
  existing target is replaced only if it is empty, or if it holds moeserve's own marker file (it was
  written by moeserve before) and the caller allows replacing it (`--force`).
- `check_output_file` / `check_output_dir` run before any work, so an unusable output is refused in
  the first second rather than after minutes of profiling or training.
- `OutputSet` stages several files and renames them all at the end: a command that fails half-way
  leaves none of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moeserve.errors import MoeServeError


def _missing_parents(path: Path) -> list[Path]:
    """Ancestors of `path` that do not exist yet, outermost first."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing[::-1]


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of `path`; -> the directories created (to undo on failure)."""
    created = []
    for folder in _missing_parents(path):
        try:
            folder.mkdir()
        except OSError as exc:
            _remove_empty(created)
            raise MoeServeError(f"cannot create directory {folder}: {exc.strerror or exc}") from None
        created.append(folder)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only ever empty directories this module created


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder` (os.access is not trustworthy for root or odd filesystems)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".moeserve-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise MoeServeError(f"{what} {folder} is not writable: {exc.strerror or exc}") from None


def _check_parent_writable(path: Path, what: str) -> None:
    """The parent of `path` is (or can be made) a writable directory; nothing is left behind."""
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise MoeServeError(f"{what} {path}: {blocking} is a file, not a directory")
    created = _make_parents(path)
    try:
        _probe_writable(path.parent, f"{what} directory")
    finally:
        _remove_empty(created)


def check_output_file(target: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an output file path that cannot be written: a directory (or '.') at the path, a parent that
    is a file, an unwritable location. Leaves nothing behind. -> the path."""
    path = Path(target)
    if str(target) in ("", ".", "..") or path.is_dir():
        raise MoeServeError(f"{what} {target} is a directory: give a file path (moeserve never replaces a directory)")
    _check_parent_writable(path, what)
    return path


def _write_file_to(tmp: Path, target: Path) -> None:
    if target.is_dir():  # appeared since the check: still never replaced
        raise MoeServeError(f"{target} is a directory: give a file path (moeserve never replaces a directory)")
    os.replace(tmp, target)


def _temp_file_beside(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; rename it onto `target` if the block succeeds.

    Only a file (or nothing) may stand at `target`. On any exception the temporary file is removed,
    `target` is untouched, and parent directories this call created are removed again.
    """
    target = check_output_file(target)
    created = _make_parents(target)
    tmp = _temp_file_beside(target)
    try:
        yield tmp
        _write_file_to(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_empty(created)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write `text` to the file `target` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)


def check_output_dir(target: str | os.PathLike, marker: str, force: bool = False, what: str = "output") -> Path:
    """Refuse a directory output that cannot be written or must not be replaced, before any work.

    Allowed: nothing at `target`, an empty directory, or (with `force`) a directory holding `marker`,
    i.e. one moeserve wrote before. A file at `target`, or a non-empty directory without the marker, is
    refused whatever `force` says."""
    path = Path(target)
    if str(target) in ("", ".", ".."):
        raise MoeServeError(f"{what} {target!r}: give the path of a new directory")
    if path.exists() and not path.is_dir():
        raise MoeServeError(f"{what} {target} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not (path / marker).is_file():
            raise MoeServeError(f"{what} {target} exists and was not written by moeserve (no {marker}): "
                                "give a new directory; moeserve never replaces other directories")
        if not force:
            raise MoeServeError(f"{what} {target} already exists (use --force to replace it)")
    _check_parent_writable(path, what)
    return path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, marker: str, force: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory beside `target`; it becomes `target` if the block succeeds and
    wrote `marker` into it. An existing `target` is replaced only as `check_output_dir` allows."""
    target = check_output_dir(target, marker, force)
    created = _make_parents(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"a moeserve directory output must hold its marker {marker}")
        _swap_in(tmp, target, marker, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary directory this call made, nothing else
        _remove_empty(created)
        raise


def _swap_in(tmp: Path, target: Path, marker: str, force: bool) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    check_output_dir(target, marker, force)  # the checks again, right before replacing
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)  # verified above: holds moeserve's marker and --force was given


class OutputSet:
    """Several output files that appear together: `path(target)` gives a temporary path to write to,
    `commit()` renames them all; leaving the `with` block by an exception removes them all."""

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def path(self, target: str | os.PathLike) -> Path:
        target = check_output_file(target)
        self._created += _make_parents(target)
        tmp = _temp_file_beside(target)
        self._staged.append((tmp, target))
        return tmp

    def commit(self) -> None:
        for tmp, target in self._staged:
            _write_file_to(tmp, target)
        self._staged, self._created = [], []

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _remove_empty(self._created)
        self._staged, self._created = [], []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
