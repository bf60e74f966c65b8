"""A left-padded batch of per-request KV caches that requests join and leave between decode steps.

Every row of a `DynamicCache` layer is `[heads, L, head_dim]`; a request whose history is shorter than L
sits right-aligned with zero padding on its left, hidden by a 0 in `mask`. Left padding keeps the
distance between any two real tokens of a row unchanged, so causal and sliding-window masks computed
from the 2-D mask stay right; this is why every layer is a full `DynamicLayer` (a sliding-window layer
would drop the oldest *columns*, which are different tokens in different rows). Position ids are the
per-row real lengths, as in `generate` with left padding.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from moeserve.errors import MoeServeError


def new_cache() -> DynamicCache:
    """An empty cache of full (non-sliding) dynamic layers, filled lazily by the model."""
    return DynamicCache()


def _check(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise MoeServeError(f"the batching scheduler needs plain KV caches, got {type(layer).__name__}")


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, length, D] with zeros on the left."""
    missing = length - t.shape[-2]
    if missing == 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], missing, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


class KVBatch:
    """Rows of requests being decoded together.

    cache: DynamicCache with layers [B, H, L, D]; mask: [B, L] long (1 = real token); lengths: [B] long
    (real tokens per row).
    """

    def __init__(self, cache: DynamicCache | None = None, mask: torch.Tensor | None = None):
        self.cache = cache if cache is not None else new_cache()
        self.mask = mask
        if cache is not None:
            _check(cache)

    @classmethod
    def single(cls, cache: DynamicCache, length: int, device: torch.device) -> KVBatch:
        """One request's cache after its (unpadded) prefill of `length` tokens."""
        return cls(cache, torch.ones((1, length), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def extend(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours (both left-padded to the wider of the two)."""
        if other.size == 0:
            return
        if self.size == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if not (mine.is_initialized and theirs.is_initialized):
                raise MoeServeError("cannot batch KV caches with uninitialised layers")
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        pads = [m.new_zeros((m.shape[0], width - m.shape[1])) for m in (self.mask, other.mask)]
        self.mask = torch.cat([torch.cat([pads[0], self.mask], 1), torch.cat([pads[1], other.mask], 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then drop the leading columns that are padding in every row."""
        if not rows:
            self.cache, self.mask = new_cache(), None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        cut = int(self.width - mask.sum(dim=1).max().item())
        self.mask = mask[:, cut:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., cut:, :]
            layer.values = layer.values.index_select(0, index)[..., cut:, :]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask [B, L + 1] and position ids [B, 1] for one decode step; call `advance` after it."""
        ones = self.mask.new_ones((self.size, 1))
        return torch.cat([self.mask, ones], dim=1), self.lengths.unsqueeze(1)

    def advance(self, step_mask: torch.Tensor) -> None:
        """After a decode step: the step's mask becomes the batch's mask (the cache grew by one column)."""
        self.mask = step_mask
