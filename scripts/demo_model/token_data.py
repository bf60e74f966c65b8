"""Tokenised, domain-balanced training streams and unigram counts (shared by train.py and evaluate.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from demo_paths import DOMAINS, TRAIN_DIR, read_jsonl
from tokenizers import Tokenizer


@dataclass(frozen=True)
class DomainStream:
    """One domain's training tokens: `tokens: [n] int32`, chunks as <|bos|> ids <|eos|> back to back."""

    domain: str
    tokens: np.ndarray
    documents: int
    chunks: int
    chars: int


def load_raw_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def encode_chunks(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def build_streams(tokenizer: Tokenizer, bos_id: int, eos_id: int, tokens_per_domain: int | None) -> list[DomainStream]:
    """Tokenise each domain's training split in file order (seeded document order from build_corpus).

    Every domain is cut at a chunk boundary to the same token budget: `tokens_per_domain`, or the
    smallest domain's size when None, so the domains are balanced.
    """
    encoded = {}
    for domain in DOMAINS:
        rows = list(read_jsonl(TRAIN_DIR / f"{domain}.jsonl"))
        encoded[domain] = (rows, encode_chunks(tokenizer, [r["text"] for r in rows]))
    budget = tokens_per_domain or min(sum(len(ids) + 2 for ids in e[1]) for e in encoded.values())
    streams = []
    for domain, (rows, ids_per_chunk) in encoded.items():
        pieces, used, docs, chars = [], 0, set(), 0
        for row, ids in zip(rows, ids_per_chunk, strict=True):
            if used + len(ids) + 2 > budget:
                break
            pieces.append(np.asarray([bos_id, *ids, eos_id], dtype=np.int32))
            used += len(ids) + 2
            docs.add(row["doc"])
            chars += len(row["text"])
        streams.append(DomainStream(domain, np.concatenate(pieces), len(docs), len(pieces), chars))
    return streams


def unigram_counts(stream: DomainStream, vocab_size: int, special_ids: tuple[int, ...]) -> np.ndarray:
    """`counts: [vocab] int64` of the stream's text tokens (special tokens are never scored, so count 0)."""
    counts = np.bincount(stream.tokens, minlength=vocab_size).astype(np.int64)
    counts[list(special_ids)] = 0
    return counts


def unigram_log_probs(counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed unigram model. `counts: [vocab]` -> `log_probs: [vocab] float64` (natural log)."""
    smoothed = counts.astype(np.float64) + 1.0
    return np.log(smoothed / smoothed.sum())
