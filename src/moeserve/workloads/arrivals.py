"""Real request arrival times: the Azure LLM inference traces of 2023 (Splitwise, ISCA 2024), and time-scaling.

Files and attribution: data/azure-llm-2023/ (CC-BY 4.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeserve.errors import MoeServeError

AZURE_DIR = Path(__file__).resolve().parent / "data" / "azure-llm-2023"
AZURE_TRACES = {"azure-conv": "conv.csv", "azure-code": "code.csv"}
CSV_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True, eq=False)
class ArrivalTrace:
    """Requests in arrival order.

    arrival_s: [requests] float64 seconds since the first request (sorted, starts at 0)
    context_tokens, generated_tokens: [requests] int64
    """

    name: str
    arrival_s: np.ndarray
    context_tokens: np.ndarray
    generated_tokens: np.ndarray


def _timestamp_ns(text: str, where: str) -> int:
    """`2023-11-16 18:15:46.6805900` -> ns since the epoch; any number of fractional digits."""
    whole, _, fraction = text.strip().partition(".")
    if fraction and not (fraction.isascii() and fraction.isdigit()):
        raise MoeServeError(f"{where}: bad timestamp {text!r}")
    try:
        seconds = np.datetime64(whole.replace(" ", "T"), "s").astype(np.int64)
    except ValueError:
        raise MoeServeError(f"{where}: bad timestamp {text!r}") from None
    return int(seconds) * 1_000_000_000 + int(fraction[:9].ljust(9, "0"))


def _is_count(cell: str) -> bool:
    cell = cell.strip()
    return cell.isascii() and cell.isdigit()


def read_arrivals_csv(path: Path, name: str | None = None) -> ArrivalTrace:
    """Parse a `TIMESTAMP,ContextTokens,GeneratedTokens` CSV (a UTF-8 BOM on the first line is fine)."""
    path = Path(path)
    if not path.is_file():
        raise MoeServeError(f"arrival trace not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").split("\n")]
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != CSV_HEADER:
        raise MoeServeError(f"{path}: first line must be {','.join(CSV_HEADER)}")
    stamps, context, generated = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        where = f"{path} line {number}"
        cells = line.split(",")
        if len(cells) != 3 or not all(_is_count(c) for c in cells[1:]):
            raise MoeServeError(f"{where}: expected TIMESTAMP,ContextTokens,GeneratedTokens, got {line!r}")
        stamps.append(_timestamp_ns(cells[0], where))
        context.append(int(cells[1]))
        generated.append(int(cells[2]))
    if not stamps:
        raise MoeServeError(f"{path}: no requests")
    ns = np.asarray(stamps, dtype=np.int64)
    order = np.argsort(ns, kind="stable")
    ns = ns[order] - ns[order[0]]  # integer ns first: epoch seconds in float64 would lose the microseconds
    return ArrivalTrace(
        name=path.stem if name is None else name,
        arrival_s=ns.astype(np.float64) / 1e9,
        context_tokens=np.asarray(context, dtype=np.int64)[order],
        generated_tokens=np.asarray(generated, dtype=np.int64)[order],
    )


def load_arrivals(name: str) -> ArrivalTrace:
    """A vendored trace: "azure-conv" (19,366 requests) or "azure-code" (8,819 requests)."""
    if name not in AZURE_TRACES:
        raise MoeServeError(f"unknown arrival trace {name!r} (valid: {', '.join(AZURE_TRACES)})")
    return read_arrivals_csv(AZURE_DIR / AZURE_TRACES[name], name)


def mean_rate(trace: ArrivalTrace) -> float:
    """Requests per second: (requests - 1) / time from the first to the last arrival."""
    n = len(trace.arrival_s)
    span = float(trace.arrival_s[-1]) if n else 0.0
    if n < 2 or span <= 0:
        raise MoeServeError(f"trace {trace.name!r} has no time span, so no mean rate")
    return (n - 1) / span


def _slice(trace: ArrivalTrace, count: int, time_scale: float) -> ArrivalTrace:
    return ArrivalTrace(
        name=trace.name,
        arrival_s=trace.arrival_s[:count] * time_scale,
        context_tokens=trace.context_tokens[:count].copy(),
        generated_tokens=trace.generated_tokens[:count].copy(),
    )


def scale_arrivals(
    trace: ArrivalTrace,
    rate: float | None = None,
    speedup: float | None = None,
    duration_s: float | None = None,
) -> ArrivalTrace:
    """Stretch or squeeze time to a target mean rate (req/s) or speed-up factor; keep arrivals <= duration_s.

    With `rate` and `duration_s` together the scale is fitted to the kept prefix (the first
    floor(rate * duration_s) + 1 requests), so the returned trace itself has the requested mean rate;
    a bursty trace cut after scaling would not. If the trace has fewer requests, all are kept (shorter).
    Inter-arrival gaps keep their shape: only the time axis is scaled.
    """
    if rate is not None and speedup is not None:
        raise MoeServeError("give a target rate or a speed-up, not both")
    for label, value in (("rate", rate), ("speedup", speedup), ("duration_s", duration_s)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise MoeServeError(f"{label} must be a positive number, got {value}")
    n = len(trace.arrival_s)
    if rate is not None:
        count = n if duration_s is None else min(n, math.floor(rate * duration_s) + 1)
        if count < 2:
            raise MoeServeError(f"scaling {trace.name!r} to {rate} req/s keeps fewer than 2 requests: no rate to fit")
        prefix = _slice(trace, count, 1.0)
        return _slice(prefix, count, mean_rate(prefix) / rate)
    scaled = _slice(trace, n, 1.0 / speedup if speedup is not None else 1.0)
    if duration_s is not None:
        scaled = _slice(scaled, int(np.searchsorted(scaled.arrival_s, duration_s, side="right")), 1.0)
    return scaled
