"""Units: the one definition of byte multiples (binary, as memory is sized)."""

MIB = 1 << 20
GIB = 1 << 30


def mib(nbytes: float) -> float:
    """Bytes -> MiB."""
    return nbytes / MIB


def gib(nbytes: float) -> float:
    """Bytes -> GiB."""
    return nbytes / GIB
