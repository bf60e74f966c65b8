"""Text for router fine-tuning: a seeded train/held-out split by document, and token windows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moeserve.errors import MoeServeError


def split_documents(prompts: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Split per domain (stratified), so every domain has held-out documents the training never sees."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for domain in sorted({p.domain or "" for p in prompts}):
        docs = [p for p in prompts if (p.domain or "") == domain]
        order = rng.permutation(len(docs))
        n_eval = max(1, int(round(eval_fraction * len(docs)))) if len(docs) > 1 else 0
        held += [docs[i] for i in order[:n_eval]]
        train += [docs[i] for i in order[n_eval:]]
    if not train or not held:
        raise MoeServeError("need at least two documents to split into training and held-out text")
    return train, held


def token_windows(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (separated by EOS) and cut into [N, seq_len] windows of token ids."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    n = len(ids) // seq_len
    if n == 0:
        raise MoeServeError(f"not enough text for one window of {seq_len} tokens ({len(ids)} tokens)")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def batches(windows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded shuffled batches [B, S] of windows (reshuffled each epoch)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(windows), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size) or [0]:
            yield windows[order[i : i + batch_size]]
