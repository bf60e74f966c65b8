"""transformers v5's experts interface, used in one way: register an implementation, switch a model to
it, find the implementation it replaced.

A MoE block calls `experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`; the function
that runs is looked up by name in `ALL_EXPERTS_FUNCTIONS` (the model's `experts_implementation`). moeserve
registers its own names there: "moeserve" (serving dispatch) and "moeserve_null" (zero-cost experts for
measuring the non-expert part).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeserve.errors import MoeServeError


def register(name: str, forward: Callable) -> None:
    """Make `name` a valid experts implementation (idempotent). forward(module, x, top_k_index, top_k_weights)."""
    ALL_EXPERTS_FUNCTIONS.register(name, forward)


def current(model: nn.Module) -> dict[str, str | None]:
    """The experts implementation of `model` and each of its sub-models (what `restore` takes back)."""
    return model.get_experts_implementation()


def switch(model: nn.Module, name: str) -> dict[str, str | None]:
    """Switch `model` (and its sub-models) to the registered implementation `name`; -> the previous ones.
    MoeServeError when the model's experts do not dispatch through the interface."""
    previous = current(model)
    model.set_experts_implementation(name)
    if name not in current(model).values():
        model.set_experts_implementation(previous)
        raise MoeServeError(f"{type(model).__name__} does not accept a custom experts implementation")
    return previous


def restore(model: nn.Module, previous: dict[str, str | None]) -> None:
    """Undo `switch`."""
    model.set_experts_implementation(previous)


@contextlib.contextmanager
def using(model: nn.Module, name: str) -> Iterator[None]:
    """Run `model` with the experts implementation `name` inside the block; the previous one after."""
    previous = switch(model, name)
    try:
        yield
    finally:
        restore(model, previous)


def implementation(experts: nn.Module, name: str) -> Callable:
    """The function the experts module `experts` would run under implementation `name` (its own
    `forward` for the eager default)."""
    original = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    return ALL_EXPERTS_FUNCTIONS.get_interface(name, original)
