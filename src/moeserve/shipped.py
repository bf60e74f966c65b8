"""Files moeserve ships beside its code, found by name: hardware and pricing profiles, model cards.

One lookup for all of them: a path that exists (or looks like a path) is taken as given; a bare name is
searched in the installed package's copy first, then in a source checkout's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from moeserve.errors import MoeServeError

_PACKAGE = Path(__file__).resolve().parent  # .../moeserve


def shipped_dirs(kind: str) -> list[Path]:
    """Folders holding shipped `kind` files ("hardware", "pricing"), in lookup order."""
    return [_PACKAGE / "_profiles" / kind, _PACKAGE.parent.parent / "profiles" / kind]


def shipped_names(kind: str, suffix: str = ".yaml") -> list[str]:
    """Names (file stems) of the shipped `kind` files, sorted."""
    return sorted({p.stem for d in shipped_dirs(kind) if d.is_dir() for p in d.glob(f"*{suffix}")})


def resolve_shipped(name_or_path: str | os.PathLike, kind: str, what: str, suffix: str = ".yaml") -> Path:
    """A file path, or the shipped `kind` file named `name_or_path` (with or without its suffix)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if os.sep in text or text.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise MoeServeError(f"{what} not found: {path}")
        return path
    for folder in shipped_dirs(kind):
        candidate = folder / f"{text.removesuffix(suffix)}{suffix}"
        if candidate.is_file():
            return candidate
    known = ", ".join(shipped_names(kind, suffix)) or "none"
    raise MoeServeError(f"unknown {what} {text!r} (shipped: {known}; or give a path to a {suffix} file)")
