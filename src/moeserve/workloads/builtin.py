"""The built-in prompt sets: vendored human-written benchmarks, their mix, and the demo model's held-out text.

Where each vendored file comes from, and how it was selected: data/SOURCES.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moeserve.errors import MoeServeError
from moeserve.workloads.prompt_files import Prompt, read_jsonl_prompts
from moeserve.workloads.subset import seeded_pick, seeded_rank_key

DATA_DIR = Path(__file__).resolve().parent / "data"
HELDOUT_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo" / "heldout"
CORPUS_DOMAINS = ("code", "docs", "prose", "dictionary")

VENDORED = ("mtbench", "code", "math", "qa")
# In `mixed` each source is one domain; MT-Bench's eight categories collapse to "chat" so the four
# sources weigh the same and its "math"/"coding" categories do not merge with the math and code sets.
MIXED_DOMAIN = {"mtbench": "chat", "code": "code", "math": "math", "qa": "qa"}
MIXED_SEED = 0


def builtin_names() -> list[str]:
    """Names accepted as `builtin:NAME`."""
    return [*VENDORED, "mixed", "corpus"]


def read_vendored(name: str) -> list[Prompt]:
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise MoeServeError(f"builtin:{name} is missing from this install ({path}); rebuild with scripts/build_workloads.py")
    return read_jsonl_prompts(path)


def read_mixed() -> list[Prompt]:
    """An even mix: from each vendored set the same number of prompts (the smallest set's size), shuffled."""
    sets = {name: read_vendored(name) for name in VENDORED}
    per_set = min(len(prompts) for prompts in sets.values())
    mixed = []
    for name, prompts in sets.items():
        picked = seeded_pick([p.id for p in prompts], per_set, MIXED_SEED)
        mixed.extend(dataclasses.replace(prompts[i], domain=MIXED_DOMAIN[name]) for i in picked)
    return sorted(mixed, key=lambda p: seeded_rank_key(MIXED_SEED, p.id))


def read_corpus(heldout_dir: Path | None = None) -> list[Prompt]:
    """The demo model's held-out text: `<heldout_dir>/<domain>.jsonl`, objects {"text", "domain"}."""
    heldout_dir = HELDOUT_DIR if heldout_dir is None else Path(heldout_dir)
    missing = [d for d in CORPUS_DOMAINS if not (heldout_dir / f"{d}.jsonl").is_file()]
    if missing:
        names = ", ".join(f"{d}.jsonl" for d in missing)
        raise MoeServeError(
            f"builtin:corpus needs the demo model's held-out text, missing in {heldout_dir}: {names} "
            "(the demo-model build in scripts/demo_model writes them)"
        )
    prompts: list[Prompt] = []
    for domain in CORPUS_DOMAINS:
        prompts.extend(read_jsonl_prompts(heldout_dir / f"{domain}.jsonl", f"corpus/{domain}", domain))
    return prompts


def read_builtin(name: str) -> list[Prompt]:
    if name in VENDORED:
        return read_vendored(name)
    if name == "mixed":
        return read_mixed()
    if name == "corpus":
        return read_corpus()
    raise MoeServeError(f"unknown builtin prompt set {name!r} (valid: {', '.join(builtin_names())})")
