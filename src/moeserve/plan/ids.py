"""Expert-function ids: the one place their format is defined (plans, live replicas, metrics labels)."""

from __future__ import annotations


def remoe_function_id(layer: int, replica: int) -> str:
    """Replica `replica` of decoder layer `layer`'s remote experts (Remoe [IV-E])."""
    return f"L{layer}-r{replica}"


def device_function_id(layer: int, device: int) -> str:
    """The experts of decoder layer `layer` placed on device `device` (MoEless)."""
    return f"L{layer}-d{device}"


def straggler_replica_id(layer: int, expert: int, serial: int) -> str:
    """A replica of one straggler expert added while serving (MoEless live scaling); `serial` keeps ids unique."""
    return f"L{layer}-e{expert}-x{serial}"


def layer_group(layer: int) -> str:
    """The group of a layer's remote replicas (they hold one remote set between them)."""
    return f"L{layer}"


def device_of(function_id: str) -> int | None:
    """The MoEless device of a `device_function_id` (None for other ids)."""
    head, _, device = function_id.rpartition("-d")
    return int(device) if head.startswith("L") and device.isdigit() else None
