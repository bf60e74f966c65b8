"""Option value checks at parse time: finite numbers in range, so no command runs before refusing.

Typer's `min=` lets NaN and infinity through for floats; these parsers do not. Each returns a
function usable as `typer.Option(..., parser=...)`; a bad value is a usage error (one line, exit 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import typer


def number(*, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, integer: bool = False) -> Callable[[str], float]:
    """A parser for a finite number in [low, high] (open ends with *_open); `integer` for whole numbers."""

    def describe() -> str:
        if low is not None and high is not None:
            return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if low is not None:
            return f"{'>' if low_open else '>='} {low:g}"
        if high is not None:
            return f"{'<' if high_open else '<='} {high:g}"
        return "finite"

    def parse(text) -> float:
        if isinstance(text, int | float) and not isinstance(text, bool):
            value = float(text)
        else:
            try:
                value = float(str(text).strip())
            except ValueError:
                raise typer.BadParameter(f"{text!r} is not a number") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise typer.BadParameter(f"must be a finite number {describe()}, got {text}")
        if integer:
            if value != int(value):
                raise typer.BadParameter(f"must be a whole number, got {text}")
            return int(value)
        return value

    parse.__name__ = "NUMBER"
    return parse


POSITIVE = number(low=0.0, low_open=True)
NON_NEGATIVE = number(low=0.0)
UNIT_OPEN = number(low=0.0, high=1.0, low_open=True, high_open=True)


def choice(*values: str) -> Callable[[str], str]:
    """A parser for one of `values` (a usage error names them)."""

    def parse(text) -> str:
        if str(text) not in values:
            raise typer.BadParameter(f"must be one of {', '.join(values)}, got {text}")
        return str(text)

    parse.__name__ = "|".join(values).upper()
    return parse
