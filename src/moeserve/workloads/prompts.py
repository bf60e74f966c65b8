"""load_prompts: one entry point for `builtin:NAME`, .jsonl and .txt prompt sources."""

from __future__ import annotations

from pathlib import Path

from moeserve.errors import MoeServeError
from moeserve.workloads.builtin import read_builtin
from moeserve.workloads.prompt_files import Prompt, read_jsonl_prompts, read_txt_prompts
from moeserve.workloads.subset import stratified_subset

BUILTIN_PREFIX = "builtin:"


def read_source(source: str) -> list[Prompt]:
    """Every prompt of `source`, in source order."""
    if source.startswith(BUILTIN_PREFIX):
        prompts = read_builtin(source[len(BUILTIN_PREFIX):])
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            prompts = read_jsonl_prompts(path)
        elif suffix == ".txt":
            prompts = read_txt_prompts(path)
        else:
            raise MoeServeError(
                f"unsupported prompt source {source!r}: use builtin:NAME, a .jsonl file or a .txt file"
            )
    if not prompts:
        raise MoeServeError(f"no usable prompt in {source} (every prompt is blank)")
    return prompts


def load_prompts(source: str, max_prompts: int | None = None, seed: int = 0) -> list[Prompt]:
    """Prompts from `source`: "builtin:NAME", a .jsonl file or a .txt file (formats: docs/workloads.md).

    max_prompts: keep a seeded subset of this size, spread evenly across domains (see subset.py);
    the kept prompts stay in source order. None keeps everything.
    """
    if max_prompts is not None and (isinstance(max_prompts, bool) or max_prompts < 1):
        raise MoeServeError(f"max_prompts must be a positive integer, got {max_prompts}")
    prompts = read_source(source)
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    keep = stratified_subset([p.id for p in prompts], [p.domain for p in prompts], max_prompts, seed)
    return [prompts[i] for i in keep]
