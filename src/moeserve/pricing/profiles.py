"""Serverless pricing profiles (profiles/pricing/*.yaml): load, validate, merge a CPU and a GPU offering.

Remoe [II] bills every function by memory x duration: the GPU main function by its GPU memory (or, as
most GPU providers do, by whole GPUs) plus its host memory, CPU-only remote functions by their memory.
A profile file holds a `cpu_function` section, a `gpu_function` section, or both; a plan needs one of
each, so `load_pricing` takes one or more files and merges them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moeserve.errors import MoeServeError
from moeserve.shipped import resolve_shipped
from moeserve.units import GIB

SCHEMA = "moeserve.pricing/1"


@dataclass(frozen=True)
class CpuFunctionPricing:
    """A CPU-only function offering (e.g. AWS Lambda): memory in MB, vCPUs proportional to memory."""

    usd_per_gb_second: float
    usd_per_request: float
    memory_min_mb: int
    memory_max_mb: int
    memory_step_mb: int
    mb_per_vcpu: float
    payload_limit_bytes: int
    billing_granularity_s: float
    source: str

    def round_memory_up(self, memory_mb: float) -> int:
        """The smallest configurable memory size >= memory_mb (clipped to the offering's range)."""
        steps = math.ceil(max(memory_mb - self.memory_min_mb, 0.0) / self.memory_step_mb - 1e-9)
        return int(min(self.memory_min_mb + steps * self.memory_step_mb, self.memory_max_mb))

    def billed_s(self, duration_s: Any) -> Any:
        """Billed duration: rounded up to the billing granularity (duration 0 bills nothing)."""

        g = self.billing_granularity_s
        d = np.asarray(duration_s, dtype=np.float64)
        return d if g <= 0 else np.ceil(d / g - 1e-9) * g


@dataclass(frozen=True)
class GpuFunctionPricing:
    """A GPU function offering: GPU memory billed per GB-second or per whole GPU, host memory per GB-second."""

    gpu_name: str
    gpu_memory_gb: float
    billing: str  # "gpu_memory" (per GB of GPU memory used) or "whole_gpu"
    usd_per_gpu_gb_second: float  # used when billing == "gpu_memory"
    usd_per_gpu_second: float  # used when billing == "whole_gpu"
    host_usd_per_gb_second: float
    usd_per_request: float
    max_gpus: int
    source: str

    def gpus_needed(self, gpu_bytes: float) -> int:
        return max(1, math.ceil(gpu_bytes / (self.gpu_memory_gb * GIB) - 1e-12))

    def usd_per_second(self, gpu_bytes: float, host_bytes: float) -> float:
        """What the main function costs per second of execution with this much GPU and host memory."""
        if self.billing == "whole_gpu":
            gpu = self.gpus_needed(gpu_bytes) * self.usd_per_gpu_second
        else:
            gpu = gpu_bytes / GIB * self.usd_per_gpu_gb_second
        return gpu + host_bytes / GIB * self.host_usd_per_gb_second

    def fits(self, gpu_bytes: float) -> bool:
        return self.gpus_needed(gpu_bytes) <= self.max_gpus

    def gpu_gb_second_equivalent(self) -> float:
        """GPU price per GB-second of GPU memory (whole-GPU prices divided by the GPU's memory)."""
        if self.billing == "whole_gpu":
            return self.usd_per_gpu_second / self.gpu_memory_gb
        return self.usd_per_gpu_gb_second


@dataclass(frozen=True)
class Pricing:
    """The prices a plan is costed with: one CPU offering (remote functions, all-CPU) and one GPU offering."""

    cpu: CpuFunctionPricing
    gpu: GpuFunctionPricing

    @property
    def gpu_to_cpu_ratio(self) -> float:
        """GPU price per GB-second over CPU price per GB-second (the paper assumes >= 3)."""
        return self.gpu.gpu_gb_second_equivalent() / self.cpu.usd_per_gb_second


def resolve_pricing_path(name_or_path: str | os.PathLike) -> Path:
    """A file path as given, or a profile name (`aws-lambda-x86`) among the shipped profiles."""
    return resolve_shipped(name_or_path, "pricing", "pricing profile")


def load_pricing(*names_or_paths: str | os.PathLike) -> Pricing:
    """Load and merge pricing files; together they must define exactly one CPU and one GPU offering."""
    cpu: list[CpuFunctionPricing] = []
    gpu: list[GpuFunctionPricing] = []
    for item in names_or_paths:
        path = resolve_pricing_path(item)
        c, g = parse_pricing(_read_yaml(path), origin=path.name)
        cpu += [c] if c else []
        gpu += [g] if g else []
    if len(cpu) != 1 or len(gpu) != 1:
        raise MoeServeError(
            f"pricing needs exactly one cpu_function and one gpu_function section, got {len(cpu)} and {len(gpu)}"
        )
    return Pricing(cpu=cpu[0], gpu=gpu[0])


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MoeServeError(f"pricing profile {path.name}: unreadable YAML ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise MoeServeError(f"pricing profile {path.name}: expected a mapping at the top level")
    return data


def parse_pricing(
    data: dict, origin: str = "<mapping>"
) -> tuple[CpuFunctionPricing | None, GpuFunctionPricing | None]:
    """Validate one profile mapping; bad or missing fields raise a one-line MoeServeError."""
    if data.get("schema") != SCHEMA:
        raise MoeServeError(
            f"pricing profile {origin}: schema must be {SCHEMA!r}, got {data.get('schema')!r}"
        )
    for key in ("name", "source", "as_of", "currency"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise MoeServeError(f"pricing profile {origin}: missing text field {key!r}")
    if data["currency"] != "USD":
        raise MoeServeError(
            f"pricing profile {origin}: only USD prices are supported, got {data['currency']!r}"
        )
    source = f"{data['name']} ({data['source']}, as of {data['as_of']})"
    cpu_raw, gpu_raw = data.get("cpu_function"), data.get("gpu_function")
    if cpu_raw is None and gpu_raw is None:
        raise MoeServeError(f"pricing profile {origin}: needs a cpu_function or a gpu_function section")
    field = _Fields(origin)
    cpu = gpu = None
    if cpu_raw is not None:
        s = field.section(cpu_raw, "cpu_function")
        memory = field.section(s.get("memory_mb"), "cpu_function.memory_mb")
        cpu = CpuFunctionPricing(
            usd_per_gb_second=field.number(s, "cpu_function", "usd_per_gb_second", positive=True),
            usd_per_request=field.number(s, "cpu_function", "usd_per_request"),
            memory_min_mb=int(field.number(memory, "cpu_function.memory_mb", "min", positive=True)),
            memory_max_mb=int(field.number(memory, "cpu_function.memory_mb", "max", positive=True)),
            memory_step_mb=int(field.number(memory, "cpu_function.memory_mb", "step", positive=True)),
            mb_per_vcpu=field.number(s, "cpu_function", "mb_per_vcpu", positive=True),
            payload_limit_bytes=int(field.number(s, "cpu_function", "payload_limit_bytes", positive=True)),
            billing_granularity_s=field.number(s, "cpu_function", "billing_granularity_s"),
            source=source,
        )
        if cpu.memory_min_mb > cpu.memory_max_mb:
            raise MoeServeError(f"pricing profile {origin}: cpu_function.memory_mb min exceeds max")
    if gpu_raw is not None:
        s = field.section(gpu_raw, "gpu_function")
        billing = s.get("billing")
        if billing not in ("gpu_memory", "whole_gpu"):
            raise MoeServeError(
                f"pricing profile {origin}: gpu_function.billing must be gpu_memory or whole_gpu"
            )
        gpu = GpuFunctionPricing(
            gpu_name=str(s.get("gpu_name", "gpu")),
            gpu_memory_gb=field.number(s, "gpu_function", "gpu_memory_gb", positive=True),
            billing=billing,
            usd_per_gpu_gb_second=field.number(
                s, "gpu_function", "usd_per_gpu_gb_second", positive=billing == "gpu_memory", default=0.0
            ),
            usd_per_gpu_second=field.number(
                s, "gpu_function", "usd_per_gpu_second", positive=billing == "whole_gpu", default=0.0
            ),
            host_usd_per_gb_second=field.number(s, "gpu_function", "host_usd_per_gb_second"),
            usd_per_request=field.number(s, "gpu_function", "usd_per_request", default=0.0),
            max_gpus=int(field.number(s, "gpu_function", "max_gpus", positive=True, default=8)),
            source=source,
        )
    return cpu, gpu


class _Fields:
    def __init__(self, origin: str) -> None:
        self.origin = origin

    def section(self, value: Any, name: str) -> dict:
        if not isinstance(value, dict):
            raise MoeServeError(f"pricing profile {self.origin}: {name} must be a mapping")
        return value

    def number(
        self, s: dict, section: str, key: str, positive: bool = False, default: float | None = None
    ) -> float:
        value = s.get(key, default)
        if value is None:
            raise MoeServeError(f"pricing profile {self.origin}: missing field {section}.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MoeServeError(
                f"pricing profile {self.origin}: {section}.{key} must be a number, got {value!r}"
            )
        if value < 0 or (positive and value == 0):
            raise MoeServeError(
                f"pricing profile {self.origin}: {section}.{key} must be {'positive' if positive else '>= 0'}"
            )
        return float(value)
