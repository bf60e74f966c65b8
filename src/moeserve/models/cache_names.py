"""The KV cache's name in a forward call and its output: transformers 5.2x renamed `past_key_values` (and
`cache_params`) to `cache`; the old names still work but warn once per process, so moeserve uses whichever
the installed model takes."""

from __future__ import annotations

import inspect

from torch import nn


def cache_kwarg(model: nn.Module) -> str:
    """The forward's keyword for the KV cache: `cache` in transformers >= 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: object) -> object | None:
    """The cache a forward returned, read without touching the deprecated `past_key_values` property."""
    fields = out.keys() if hasattr(out, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in fields:
            return out[name]
    return None
