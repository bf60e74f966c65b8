"""Prompt sources (built-in human-written sets, .jsonl, .txt) and real arrival-time traces (docs/workloads.md)."""

from moeserve.workloads.arrivals import (
    ArrivalTrace,
    load_arrivals,
    mean_rate,
    read_arrivals_csv,
    scale_arrivals,
)
from moeserve.workloads.builtin import builtin_names
from moeserve.workloads.pairing import pair_prompts
from moeserve.workloads.prompt_files import Prompt
from moeserve.workloads.prompts import load_prompts

__all__ = [
    "ArrivalTrace",
    "Prompt",
    "builtin_names",
    "load_arrivals",
    "load_prompts",
    "mean_rate",
    "pair_prompts",
    "read_arrivals_csv",
    "scale_arrivals",
]
