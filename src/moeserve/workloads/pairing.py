"""Giving each trace arrival a real prompt text of matching length rank."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.workloads.arrivals import ArrivalTrace
from moeserve.workloads.prompt_files import Prompt


def pair_prompts(
    trace: ArrivalTrace,
    prompts: list[Prompt],
    tokenizer_len: Callable[[str], int] = len,
    seed: int = 0,
) -> list[int]:
    """For each arrival, the index into `prompts` of the prompt at the same length quantile.

    Production contexts (median ~1k tokens in the Azure traces) are much longer than benchmark prompts,
    so lengths are matched by rank, not by value: the arrival whose context length sits at quantile q
    among the arrivals gets the prompt whose tokenizer_len(text) sits at quantile q among the prompts.
    The longest context gets the longest prompt, the shortest the shortest; equal lengths (on either
    side) are ordered by a seeded shuffle, so repeated context lengths spread over neighbouring prompts.
    Returns [requests] indices; a prompt is reused when there are more arrivals than prompts.
    """
    if not prompts:
        raise MoeServeError("no prompts to pair with the arrivals")
    n, p = len(trace.context_tokens), len(prompts)
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    lengths = np.asarray([tokenizer_len(prompt.text) for prompt in prompts], dtype=np.int64)
    prompts_by_length = np.lexsort((rng.random(p), lengths))
    arrival_rank = np.empty(n, dtype=np.int64)
    arrival_rank[np.lexsort((rng.random(n), np.asarray(trace.context_tokens)))] = np.arange(n)
    if n == 1:
        position = np.array([(p - 1) // 2])
    else:
        position = (2 * arrival_rank * (p - 1) + (n - 1)) // (2 * (n - 1))  # round(rank * (p-1) / (n-1))
    return prompts_by_length[position].tolist()
