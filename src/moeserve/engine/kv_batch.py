"""A left-padded batch of per-request caches that requests join and leave between decode steps.

The cache is the model's own: `new_cache(model)` builds what `generate` would (a `DynamicCache` from the
model's config, with each layer of the class its type needs), or nothing for a model that makes its own
cache class in its forward (MiniMax's `MiniMaxCache`); the prefill's cache is then taken from the
model's output. Rows are joined and left per kind of state a layer holds:

| state (layer classes) | join | leave |
| --- | --- | --- |
| keys / values `[B, H, L, D]` (`DynamicLayer`, MLA's latent, the attention part of hybrid layers) | left-pad `L`, concatenate rows | select rows, drop leading columns that are padding in every row |
| sliding-window layers (`DynamicSlidingWindowLayer`, `LinearAttentionAndSlidingWindowAttentionLayer`) | stored as full layers (below), then as above | as above |
| indexer keys `[B, L, D]` and positions `[P, B, L]` (`DynamicIndexedLayer`, DeepSeek-V3.2 / GLM DSA) | left-pad `L`, concatenate rows | select rows, drop the same leading columns |
| conv / recurrent states `[B, ...]` (`LinearAttentionLayer` and the hybrids; a cache's own per-layer state lists such as `MiniMaxCache.linear_cache`) | concatenate rows (no sequence axis: each row's state is its own, padding never entered it) | select rows |

A request whose history is shorter than the batch's width L sits right-aligned with zero padding on
its left, hidden by a 0 in `mask`. Left padding keeps the distance between any two real tokens of a row
unchanged, so causal and sliding-window masks computed from the 2-D mask stay right; this is why
sliding-window layers are stored in full (a sliding layer drops the oldest *columns*, which are different
tokens in different rows, and its length would differ from the mask's). Position ids are the per-row real
lengths, as in `generate` with left padding. A cache holding state of any other kind is refused in one line.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
)

from moeserve.errors import MoeServeError

# (attribute, batch axis, sequence axis or None) of the per-row tensors a cache layer may hold
_LAYER_TENSORS = (("keys", 0, -2), ("values", 0, -2), ("indexer_keys", 0, 1), ("indexer_position_ids", 1, -1))
_STATE_DICTS = ("conv_states", "recurrent_states")
# scalars and bookkeeping a layer may hold that carry no per-row data
_LAYER_SCALARS = ("_sliding_window_tensor", "cumulative_length")


def _full_layer(layer):
    """A sliding-window layer's full-length equivalent (the mask applies the window; see the module doc)."""
    if type(layer) is DynamicSlidingWindowLayer:
        return DynamicLayer()
    if type(layer) is LinearAttentionAndSlidingWindowAttentionLayer:
        return LinearAttentionAndFullAttentionLayer(number_of_states=layer.number_of_states)
    return layer


def new_cache(model: nn.Module | None = None):
    """An empty cache for one request's prefill: the model's own kind (see the module doc), or None when
    the model makes its own cache class in its forward (take it from the output then)."""
    if model is None:
        return DynamicCache()
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    config = model.config.get_text_config(decoder=True)
    cache = DynamicCache(config=config)
    cache.layers = [_full_layer(layer) for layer in cache.layers]
    return cache


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros on the left of axis `dim` up to `length`."""
    dim = dim % t.dim()
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _live(value) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() > 0


def _cache_state_lists(cache) -> dict[str, list]:
    """A cache's own per-layer lists of row states (e.g. MiniMaxCache.linear_cache), by attribute."""
    return {name: value for name, value in vars(cache).items()
            if name != "layers" and isinstance(value, list) and any(isinstance(v, torch.Tensor) for v in value)}


def _check(cache) -> None:
    """Refuse (one line) a cache holding per-row tensors this module does not know how to batch."""
    known = {a for a, _, _ in _LAYER_TENSORS} | set(_STATE_DICTS) | set(_LAYER_SCALARS)
    for layer in getattr(cache, "layers", []):
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and name not in known:
                raise MoeServeError(f"the batching scheduler cannot join rows of {type(layer).__name__}.{name}")
    for name, value in vars(cache).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            raise MoeServeError(f"the batching scheduler cannot join rows of {type(cache).__name__}.{name}")


def _join_layers(mine, theirs, width: int) -> None:
    for attr, batch, seq in _LAYER_TENSORS:
        a, b = getattr(mine, attr, None), getattr(theirs, attr, None)
        if _live(a) != _live(b):
            raise MoeServeError(f"cannot batch {type(mine).__name__} caches with and without {attr}")
        if _live(a):
            if seq is not None:
                a, b = _pad_left(a, width, seq), _pad_left(b, width, seq)
            setattr(mine, attr, torch.cat([a, b], dim=batch))
    for attr in _STATE_DICTS:
        states, other = getattr(mine, attr, None), getattr(theirs, attr, None)
        if states is None:
            continue
        for i, a in states.items():
            b = other[i]
            if _live(a) != _live(b):
                raise MoeServeError(f"cannot batch {type(mine).__name__} caches with and without {attr}[{i}]")
            if _live(a):
                states[i] = torch.cat([a, b], dim=0)


def _select_layer(layer, index: torch.Tensor, cut: int) -> None:
    for attr, batch, seq in _LAYER_TENSORS:
        t = getattr(layer, attr, None)
        if _live(t):
            t = t.index_select(batch, index.to(t.device))
            if seq is not None:
                t = t.narrow(seq % t.dim(), cut, t.shape[seq] - cut)
            setattr(layer, attr, t)
    for attr in _STATE_DICTS:
        states = getattr(layer, attr, None)
        if states is not None:
            for i, t in states.items():
                if _live(t):
                    states[i] = t.index_select(0, index.to(t.device))


class KVBatch:
    """Rows of requests being decoded together.

    cache: the model's cache (layers as in the module doc); mask: [B, L] long (1 = real token); lengths:
    [B] long (real tokens per row).
    """

    def __init__(self, cache=None, mask: torch.Tensor | None = None):
        self.cache = cache
        self.mask = mask
        if cache is not None:
            _check(cache)

    @classmethod
    def single(cls, cache, length: int, device: torch.device) -> KVBatch:
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
        if type(self.cache) is not type(other.cache) or len(self.cache.layers) != len(other.cache.layers):
            raise MoeServeError("cannot batch caches of different kinds")
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if type(mine) is not type(theirs):
                raise MoeServeError(f"cannot batch a {type(mine).__name__} with a {type(theirs).__name__}")
            _join_layers(mine, theirs, width)
        theirs_lists = _cache_state_lists(other.cache)
        for name, states in _cache_state_lists(self.cache).items():
            other_states = theirs_lists.get(name, [])
            for i, a in enumerate(states):
                b = other_states[i] if i < len(other_states) else None
                if _live(a) != _live(b):
                    raise MoeServeError(f"cannot batch {type(self.cache).__name__}.{name}[{i}] with a missing state")
                if _live(a):
                    states[i] = torch.cat([a, b], dim=0)
        pads = [m.new_zeros((m.shape[0], width - m.shape[1])) for m in (self.mask, other.mask)]
        self.mask = torch.cat([torch.cat([pads[0], self.mask], 1), torch.cat([pads[1], other.mask], 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then drop the leading columns that are padding in every row."""
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        cut = int(self.width - mask.sum(dim=1).max().item())
        self.mask = mask[:, cut:]
        for layer in self.cache.layers:
            _select_layer(layer, index, cut)
        for states in _cache_state_lists(self.cache).values():
            for i, t in enumerate(states):
                if _live(t):
                    states[i] = t.index_select(0, index.to(t.device))

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask [B, L + 1] and position ids [B, 1] for one decode step; call `advance` after it."""
        ones = self.mask.new_ones((self.size, 1))
        return torch.cat([self.mask, ones], dim=1), self.lengths.unsqueeze(1)

    def advance(self, step_mask: torch.Tensor) -> None:
        """After a decode step: the step's mask becomes the batch's mask (the cache grew by one column)."""
        self.mask = step_mask
