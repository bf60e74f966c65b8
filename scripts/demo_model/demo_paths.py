"""Where the demo-model pipeline reads and writes, and what each corpus domain is."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from moeserve.atomic import atomic_file

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSET_DIR = REPO_ROOT / "src" / "moeserve" / "assets" / "demo"
HELDOUT_DIR = ASSET_DIR / "heldout"
RUN_DIR = REPO_ROOT / "runs" / "demo_model"
TRAIN_DIR = RUN_DIR / "corpus" / "train"
TOKENIZER_WORK_DIR = RUN_DIR / "tokenizer"
TRAINED_MODEL_DIR = RUN_DIR / "model"
TRAINING_LOG = ASSET_DIR / "training_log.json"
EVAL_JSON = ASSET_DIR / "eval.json"
CORPUS_MANIFEST = RUN_DIR / "corpus" / "manifest.json"
UNIGRAM_COUNTS = ASSET_DIR / "unigram_counts.json"

DOMAINS = ("code", "docs", "prose", "dictionary")

DOMAIN_SOURCES = {
    "code": {
        "source": "CPython 3.11 standard library .py files (sysconfig.get_paths()['stdlib']), "
                  "without site-packages, test suites, codec tables and generated data modules",
        "licence": "PSF License Agreement for Python 3.11 (PSF-2.0)",
    },
    "docs": {
        "source": "Python 3.11 documentation reST sources, Debian package python3.11-doc "
                  "(/usr/share/doc/python3.11-doc/html/_sources/**/*.rst.txt)",
        "licence": "PSF License Agreement for Python 3.11 (PSF-2.0)",
    },
    "prose": {
        "source": "King James Version of the Bible, Debian packages bible-kjv-text + bible-kjv "
                  "(dumped with `bible -f gen1:1-rev22:21`)",
        "licence": "public domain",
    },
    "dictionary": {
        "source": "WordNet 3.0 definitions, Debian package dict-wn (/usr/share/dictd/wn.dict.dz, wn.index)",
        "licence": "WordNet 3.0 licence (notice kept in LICENSE-WORDNET)",
    },
}

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
