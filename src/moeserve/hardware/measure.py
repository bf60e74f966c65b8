"""`measure_hardware`: run every micro-benchmark on this machine and build its HardwareProfile."""

from __future__ import annotations

import os
import re
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from moeserve.errors import MoeServeError
from moeserve.hardware.copy_bandwidth import DEFAULT_COPY_SIZES, latency_and_bandwidth, measure_copies
from moeserve.hardware.expert import measure_expert_latency
from moeserve.hardware.fit import fit_curve, round_sig, rounded
from moeserve.hardware.machine import available_cpus, describe_machine
from moeserve.hardware.nonexpert import measure_non_expert
from moeserve.hardware.reference import datasheet_for_gpu
from moeserve.hardware.schema import (
    DTYPES,
    CopyCurve,
    ExpertCurve,
    ExpertSection,
    HardwareProfile,
    MachineInfo,
    MeasurementConditions,
    ModuleMemory,
    NonExpertCurve,
    NonExpertSection,
    TransportCurve,
)
from moeserve.hardware.timing import torch_threads
from moeserve.hardware.transport import measure_transport
from moeserve.models.adapter import expert_weights, require_moe_layers

DEFAULT_TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_PREFILL_LENGTHS = (16, 64, 256)
DEFAULT_DECODE_BATCHES = (1, 2, 4, 8, 16, 32)

Progress = Callable[[str, int, int], None]


def default_thread_counts(cpus: int | None = None) -> list[int]:
    """Every count 1..cpus on small machines; powers of two plus `cpus` above 8 (keeps the run short)."""
    cpus = cpus or available_cpus()
    if cpus <= 8:
        return list(range(1, cpus + 1))
    return sorted({1 << k for k in range(cpus.bit_length()) if 1 << k <= cpus} | {cpus})


def default_profile_name(machine: MachineInfo) -> str:
    """`cpu-2core` without a GPU, else the GPU's name as a slug (`nvidia-h100-80gb-hbm3`)."""
    if not machine.gpus:
        return f"cpu-{machine.cpu_cores}core"
    return re.sub(r"[^a-z0-9]+", "-", machine.gpus[0].name.lower()).strip("-")


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MoeServeError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rounded_points(seconds: Sequence[float]) -> tuple[float, ...]:
    return tuple(round_sig(s) for s in seconds)


def model_module_bytes(model) -> dict[str, int]:
    """non_expert_bytes / expert_bytes (one routed expert) / all_experts_bytes of a loaded MoE model."""

    layers = require_moe_layers(model, type(model).__name__)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    all_experts = sum(p.numel() * p.element_size() for layer in layers for p in layer.experts.parameters())
    return {
        "non_expert_bytes": int(total - all_experts),
        "expert_bytes": int(expert_weights(layers[0], 0).nbytes()),
        "all_experts_bytes": int(all_experts),
    }


def measure_hardware(
    hidden_size: int,
    intermediate_size: int,
    dtype: str | Sequence[str] = "float32",
    model=None,
    thread_counts: Sequence[int] | None = None,
    token_counts: Sequence[int] | None = None,
    repeats: int = 20,
    progress: Progress | None = None,
    *,
    devices: Sequence[str] | None = None,
    module_bytes: dict[str, int] | None = None,
    prefill_lengths: Sequence[int] = DEFAULT_PREFILL_LENGTHS,
    decode_batches: Sequence[int] = DEFAULT_DECODE_BATCHES,
    decode_context: int = 64,
    copy_sizes: Sequence[int] = DEFAULT_COPY_SIZES,
    measure_transport_round_trip: bool = True,
    name: str | None = None,
    source: str | None = None,
    notes: str = "",
) -> HardwareProfile:
    """Measure this machine's costs for a SwiGLU expert of (hidden_size, intermediate_size).

    dtype: one dtype name or several (expert curves for each; the transport uses the first).
    model: an already-loaded transformers MoE model for the non-expert latency (on its own device and
        dtype) and the module sizes; None skips both (module_bytes may still be given).
    thread_counts: CPU thread counts for the expert curves (default: see `default_thread_counts`);
        the non-expert part runs at the largest.
    token_counts: tokens routed to the expert (default 1, 2, 4, ..., 256); also the transport's batch rows.
    devices: "cpu" and/or "cuda" (default: cpu, plus cuda when available).
    progress: optional callable(step_name, steps_done, steps_total).
    """
    dtypes = [dtype] if isinstance(dtype, str) else list(dtype)
    if not dtypes:
        raise MoeServeError("give at least one dtype")
    torch_dtypes = [_torch_dtype(d) for d in dtypes]
    if hidden_size < 1 or intermediate_size < 1:
        raise MoeServeError(f"expert sizes must be positive, got hidden {hidden_size}, intermediate {intermediate_size}")
    token_counts = sorted({int(t) for t in (token_counts or DEFAULT_TOKEN_COUNTS)})
    if token_counts[0] < 1:
        raise MoeServeError("token counts must be >= 1")
    thread_counts = sorted({int(t) for t in (thread_counts or default_thread_counts())})
    if thread_counts[0] < 1:
        raise MoeServeError("thread counts must be >= 1")
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        raise MoeServeError("CUDA measurements asked for, but no CUDA device is available")

    expert_runs = [(dev, n) for dev in devices for n in (thread_counts if dev == "cpu" else [None])]
    has_cuda = "cuda" in devices
    total = (len(expert_runs) * len(dtypes) * len(token_counts)
             + (len(prefill_lengths) + len(decode_batches) if model is not None else 0)
             + (4 if has_cuda else 0)
             + (len(token_counts) if measure_transport_round_trip else 0))
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(label, done, total)

    machine = describe_machine()
    load_before = os.getloadavg()[0]
    cpu_before = cpu_time_snapshot()
    curves, spreads = [], []
    for tdtype, dname in zip(torch_dtypes, dtypes, strict=True):
        for dev, threads in expert_runs:
            where = f"{dev}" + (f" x{threads} threads" if threads else "")
            timings = measure_expert_latency(
                hidden_size, intermediate_size, token_counts, tdtype, dev, threads, repeats,
                progress=lambda t, where=where, dname=dname: step(f"expert {dname} {where}, {t} tokens"))
            seconds = _rounded_points([t.best_s for t in timings])
            spreads += [t.spread for t in timings]
            curves.append(ExpertCurve(device=dev, threads=threads, dtype=dname, tokens=tuple(token_counts),
                                      seconds=seconds, fit=rounded(fit_curve(token_counts, seconds)),
                                      spread=tuple(round(t.spread, 3) for t in timings)))

    non_expert = None
    if model is not None:
        param = next(model.parameters())
        on_cpu = param.device.type == "cpu"
        threads = max(thread_counts) if on_cpu else None
        with torch_threads(threads):
            timing = measure_non_expert(model, prefill_lengths, decode_batches, decode_context,
                                        repeats=max(3, repeats // 2), progress=step)
        common = dict(device=param.device.type, threads=threads, dtype=_dtype_name(param.dtype))
        prefill = _rounded_points(timing.prefill_s)
        decode = _rounded_points(timing.decode_s)
        spreads += list(timing.prefill_spread) + list(timing.decode_spread)
        non_expert = NonExpertSection(
            model=type(model).__name__,
            num_layers=timing.num_layers,
            curves=(
                NonExpertCurve(phase="prefill", x=timing.prefill_lengths, seconds_per_layer=prefill,
                               fit=rounded(fit_curve(timing.prefill_lengths, prefill)),
                               spread=tuple(round(v, 3) for v in timing.prefill_spread), **common),
                NonExpertCurve(phase="decode", x=timing.decode_batches, seconds_per_layer=decode,
                               fit=rounded(fit_curve(timing.decode_batches, decode)),
                               context_len=timing.context_len,
                               spread=tuple(round(v, 3) for v in timing.decode_spread), **common),
            ),
        )

    copies = []
    if has_cuda:
        for c in measure_copies("cuda", copy_sizes, repeats=max(3, repeats // 2), progress=step):
            latency, bandwidth = latency_and_bandwidth(c.nbytes, c.seconds)
            copies.append(CopyCurve(direction=c.direction, pinned=c.pinned, nbytes=c.nbytes,
                                    seconds=_rounded_points(c.seconds), latency_s=round_sig(latency),
                                    bandwidth_bytes_per_s=round_sig(bandwidth)))

    transport = None
    if measure_transport_round_trip:
        row_bytes = hidden_size * torch_dtypes[0].itemsize
        timing = measure_transport([t * row_bytes for t in token_counts], repeats=max(10, repeats),
                                   progress=lambda i: step(f"transport, {token_counts[i]} tokens"))
        seconds = _rounded_points(timing.seconds)
        transport = TransportCurve(
            mechanism="shared_memory+pipe", hidden_size=hidden_size, dtype=dtypes[0], tokens=tuple(token_counts),
            nbytes=timing.nbytes, seconds=seconds, fit=rounded(fit_curve(timing.nbytes, seconds)))

    sizes = dict(module_bytes or {})
    if not sizes and model is not None:
        sizes = model_module_bytes(model)
    sizes.setdefault("expert_bytes", 3 * hidden_size * intermediate_size * torch_dtypes[0].itemsize)
    unknown = set(sizes) - {"non_expert_bytes", "expert_bytes", "all_experts_bytes"}
    if unknown:
        raise MoeServeError(f"unknown module_bytes key(s): {', '.join(sorted(unknown))}")
    memory = ModuleMemory(**{k: int(v) for k, v in sizes.items()},
                          process_rss_bytes=int(psutil.Process().memory_info().rss))

    conditions = measurement_conditions(machine.cpu_cores, max(thread_counts), load_before, os.getloadavg()[0],
                                        spreads, other_cpus(cpu_before, cpu_time_snapshot()))
    return HardwareProfile(
        name=name or default_profile_name(machine),
        source=source or "measured on this machine by moeserve.hardware.measure_hardware",
        notes=notes,
        machine=machine,
        datasheet=datasheet_for_gpu(machine.gpus[0].name) if machine.gpus else None,
        expert=ExpertSection(hidden_size=hidden_size, intermediate_size=intermediate_size, curves=tuple(curves)),
        non_expert=non_expert,
        copy=tuple(copies),
        transport=transport,
        memory=memory,
        conditions=conditions,
    )


# A figure is unreliable when other work loaded the machine (its load average beyond the CPUs the
# measurement did not use, or other processes' CPU time during it) or when the repeats spread widely
# (the median point's p90 over its fastest).
LOAD_MARGIN = 0.5  # extra load average tolerated beyond the CPUs left free by the measurement
SPREAD_LIMIT = 0.5  # median spread above which the machine was visibly busy
OTHER_CPU_LIMIT = 0.5  # CPUs' worth of other processes' work, on average, while measuring


@dataclass(frozen=True)
class CpuTimes:
    """Seconds of CPU work: the whole machine's (all processes, /proc/stat; None where unreadable) and this
    process's own, at one wall-clock instant."""

    wall_s: float
    machine_busy_s: float | None
    own_s: float


def cpu_time_snapshot(stat_path: str = "/proc/stat") -> CpuTimes:
    """The machine's busy CPU seconds (user+nice+system+irq+softirq+steal) and this process's CPU seconds
    (with its reaped children's)."""
    busy = None
    try:
        with open(stat_path) as f:
            fields = f.readline().split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:9]]
            busy = (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = None
    # the measurement's own work includes its finished children (the transport echo peer it spawns)
    own = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return CpuTimes(time.monotonic(), busy, own)


def other_cpus(before: CpuTimes, after: CpuTimes) -> float | None:
    """CPUs' worth of work other processes did between two snapshots, on average (None where unknown)."""
    wall = after.wall_s - before.wall_s
    if before.machine_busy_s is None or after.machine_busy_s is None or wall <= 0:
        return None
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(others, 0.0) / wall


def measurement_conditions(cpus: int, threads_used: int, load_before: float, load_after: float,
                           spreads: Sequence[float], other_cpus: float | None = None) -> MeasurementConditions:
    """Judge a measurement: loads are 1-minute load averages, spreads the per-point p90 / fastest - 1,
    other_cpus the average CPUs other processes kept busy while it ran (a direct reading, unlike the
    load average, which lags by a minute; None where /proc/stat is unreadable, and then the load judges)."""
    spreads = [float(v) for v in spreads] or [0.0]
    median_spread = float(np.median(spreads))
    allowed = max(cpus - threads_used, 0) + LOAD_MARGIN
    # the measurement itself adds up to `threads_used` to the load: what is beyond it is other work
    other = max(load_before, load_after - threads_used)
    reasons = []
    # the load average lags by a minute and counts our own earlier work (profile's capture just before the
    # measurement): it judges only where the direct reading of other processes' CPU time is unavailable
    if other_cpus is None and other > allowed:
        reasons.append(f"the machine was loaded by other work (1-minute load {max(load_before, load_after):.1f} "
                       f"on {cpus} CPUs, {threads_used} used by the measurement)")
    if other_cpus is not None and other_cpus > OTHER_CPU_LIMIT:
        reasons.append(f"other processes kept {other_cpus:.1f} of {cpus} CPUs busy during the measurement")
    if median_spread > SPREAD_LIMIT:
        reasons.append(f"repeats spread widely (median p90/fastest {1 + median_spread:.2f}x)")
    return MeasurementConditions(cpus=cpus, load_before=round(load_before, 2), load_after=round(load_after, 2),
                                 median_spread=round(median_spread, 3), max_spread=round(max(spreads), 3),
                                 unreliable=bool(reasons), reasons=tuple(reasons),
                                 other_cpus=None if other_cpus is None else round(other_cpus, 2))
