"""Reference profiles of GPU hosts moeserve was not measured on, built from vendor datasheet figures.

Peak figures are the vendors' (dense, i.e. without 2:4 sparsity). Everything else is an *estimate*
derived from them by the simple models below, and is labelled `method: estimated` in the profile:

- expert latency on the GPU: a roofline over the three matmuls, bounded below by eager PyTorch's
  per-operator launch cost, t(T) = max(ops * launch, flops / (peak * eff_c), bytes / (bw * eff_m));
- host<->GPU copies: a fixed latency plus a fraction of the link's per-direction bandwidth;
- inter-process transport: a fixed pipe round trip plus three host memcpy passes over the payload.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeserve.hardware.fit import fit_curve, round_sig, rounded
from moeserve.hardware.schema import (
    CopyCurve,
    Datasheet,
    ExpertCurve,
    ExpertSection,
    GpuInfo,
    HardwareProfile,
    MachineInfo,
    TransportCurve,
)
from moeserve.units import GIB

TiB = 1 << 40

A100_SXM4_80GB = Datasheet(
    gpu_name="NVIDIA A100-SXM4-80GB",
    gpu_memory_bytes=80 * GIB,
    gpu_memory_bandwidth_bytes_per_s=2.039e12,
    dense_tflops={"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
    host_link="PCIe 4.0 x16",
    host_link_bandwidth_bytes_per_s=32e9,  # 64 GB/s both directions together
    nvlink_bandwidth_bytes_per_s=600e9,
)

H100_SXM5_80GB = Datasheet(
    gpu_name="NVIDIA H100 80GB HBM3 (SXM5)",
    gpu_memory_bytes=80 * GIB,
    gpu_memory_bandwidth_bytes_per_s=3.35e12,
    dense_tflops={"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4, "float8": 1978.9},
    host_link="PCIe 5.0 x16",
    host_link_bandwidth_bytes_per_s=64e9,  # 128 GB/s both directions together
    nvlink_bandwidth_bytes_per_s=900e9,
)

# Assumptions of the estimates (not measurements).
LAUNCH_S = 6e-6  # eager PyTorch, one CUDA operator: dispatch + launch
EXPERT_OPS = 5  # gate, up, silu, mul, down
COMPUTE_EFFICIENCY = 0.6  # of peak, for the small matmuls of one expert
MEMORY_EFFICIENCY = 0.8  # of peak HBM bandwidth
COPY_LATENCY_S = 10e-6
PINNED_FRACTION, PAGEABLE_FRACTION = 0.8, 0.5  # of the host link's per-direction bandwidth
PIPE_ROUND_TRIP_S = 30e-6  # measured ~30 us with this transport on a 2-core EPYC VM (cpu-2core.yaml)
HOST_MEMCPY_BYTES_PER_S = 10e9  # one core's memcpy from DRAM
TRANSPORT_COPIES = 3  # into shared memory, peer's echo, out of shared memory

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def roofline_expert_latency_s(tokens, hidden_size: int, intermediate_size: int, dtype: str,
                              datasheet: Datasheet):
    """Estimated seconds for one SwiGLU expert on the datasheet's GPU. tokens: scalar or [N].

    float32 uses the plain FP32 peak: PyTorch does not use TF32 tensor cores for float32 matmuls by default.
    """
    t = np.asarray(tokens, dtype=np.float64)
    h, i, s = hidden_size, intermediate_size, _ITEMSIZE[dtype]
    flops = 6.0 * h * i * t  # three [T, H] x [H, I]-sized matmuls, 2 flops per multiply-add
    # weights once; x read twice, y written; gate/up written, read by silu/mul, h written, read by down
    bytes_moved = s * (3.0 * h * i + 3.0 * t * h + 8.0 * t * i)
    compute_s = flops / (datasheet.dense_tflops[dtype] * 1e12 * COMPUTE_EFFICIENCY)
    memory_s = bytes_moved / (datasheet.gpu_memory_bandwidth_bytes_per_s * MEMORY_EFFICIENCY)
    result = np.maximum(EXPERT_OPS * LAUNCH_S, np.maximum(compute_s, memory_s))
    return float(result) if np.ndim(tokens) == 0 else result


def estimated_copies(datasheet: Datasheet, sizes: Sequence[int] = (1 << 16, 1 << 20, 1 << 24, 1 << 26)):
    """Host<->GPU copy curves from the link's datasheet bandwidth (estimates)."""
    copies = []
    for pinned, fraction in ((True, PINNED_FRACTION), (False, PAGEABLE_FRACTION)):
        bandwidth = datasheet.host_link_bandwidth_bytes_per_s * fraction
        for direction in ("h2d", "d2h"):
            seconds = tuple(round_sig(COPY_LATENCY_S + n / bandwidth) for n in sizes)
            copies.append(CopyCurve(direction=direction, pinned=pinned, nbytes=tuple(sizes), seconds=seconds,
                                    latency_s=COPY_LATENCY_S, bandwidth_bytes_per_s=round_sig(bandwidth),
                                    method="estimated"))
    return tuple(copies)


def estimated_transport(hidden_size: int, dtype: str, token_counts: Sequence[int]) -> TransportCurve:
    nbytes = tuple(int(t) * hidden_size * _ITEMSIZE[dtype] for t in token_counts)
    seconds = tuple(round_sig(PIPE_ROUND_TRIP_S + TRANSPORT_COPIES * n / HOST_MEMCPY_BYTES_PER_S) for n in nbytes)
    return TransportCurve(mechanism="shared_memory+pipe", hidden_size=hidden_size, dtype=dtype,
                          tokens=tuple(int(t) for t in token_counts), nbytes=nbytes, seconds=seconds,
                          fit=rounded(fit_curve(nbytes, seconds)), method="estimated")


REFERENCE_HOSTS = {
    "a100-80gb": dict(
        datasheet=A100_SXM4_80GB,
        machine=MachineInfo(cpu_model="2x AMD EPYC 7742 (NVIDIA DGX A100 host)", cpu_cores=256, ram_bytes=2 * TiB,
                            gpus=(GpuInfo(A100_SXM4_80GB.gpu_name, A100_SXM4_80GB.gpu_memory_bytes),)),
        source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB: HBM2e 2,039 GB/s; FP32 19.5, TF32 156, "
               "BF16/FP16 312 dense TFLOPS; PCIe 4.0 64 GB/s; NVLink 600 GB/s) and the NVIDIA DGX A100 "
               "datasheet (host CPU and RAM)",
    ),
    "h100-sxm": dict(
        datasheet=H100_SXM5_80GB,
        machine=MachineInfo(cpu_model="2x Intel Xeon Platinum 8480C (NVIDIA DGX H100 host)", cpu_cores=224,
                            ram_bytes=2 * TiB,
                            gpus=(GpuInfo(H100_SXM5_80GB.gpu_name, H100_SXM5_80GB.gpu_memory_bytes),)),
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM5 80GB: HBM3 3.35 TB/s; FP32 67, TF32 495, "
               "BF16/FP16 989, FP8 1979 dense TFLOPS, i.e. half the sparsity figures; PCIe 5.0 128 GB/s; "
               "NVLink 900 GB/s) and the NVIDIA DGX H100 datasheet (host CPU and RAM)",
    ),
}


def reference_profile(name: str, hidden_size: int, intermediate_size: int,
                      dtypes: Sequence[str] = ("bfloat16", "float32"),
                      token_counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256)) -> HardwareProfile:
    """The reference profile `name` (a key of REFERENCE_HOSTS) for an expert of the given geometry."""
    host = REFERENCE_HOSTS[name]
    datasheet: Datasheet = host["datasheet"]
    curves = []
    for dtype in dtypes:
        seconds = tuple(round_sig(s) for s in roofline_expert_latency_s(
            np.asarray(token_counts), hidden_size, intermediate_size, dtype, datasheet))
        curves.append(ExpertCurve(device="cuda", threads=None, dtype=dtype, tokens=tuple(token_counts),
                                  seconds=seconds, fit=rounded(fit_curve(token_counts, seconds)), method="estimated"))
    notes = (
        "Reference profile of one GPU of an 8-GPU host. `datasheet` holds vendor figures; every curve is "
        f"an estimate (method: estimated), not a measurement: expert latency = max({EXPERT_OPS} eager ops x "
        f"{LAUNCH_S * 1e6:g} us launch, flops / ({COMPUTE_EFFICIENCY:g} x peak), bytes / ({MEMORY_EFFICIENCY:g} x "
        f"HBM bandwidth)); copies = {COPY_LATENCY_S * 1e6:g} us + bytes / ({PINNED_FRACTION:g} pinned or "
        f"{PAGEABLE_FRACTION:g} pageable x PCIe per-direction bandwidth); transport = "
        f"{PIPE_ROUND_TRIP_S * 1e6:g} us + {TRANSPORT_COPIES} x bytes / {HOST_MEMCPY_BYTES_PER_S / 1e9:g} GB/s. "
        "No non-expert or CPU-expert figures: measure them on the host with `moeserve profile --hardware`."
    )
    return HardwareProfile(
        name=name,
        source=host["source"],
        notes=notes,
        machine=host["machine"],
        datasheet=datasheet,
        expert=ExpertSection(hidden_size=hidden_size, intermediate_size=intermediate_size, curves=tuple(curves)),
        copy=estimated_copies(datasheet),
        transport=estimated_transport(hidden_size, "float32" if "float32" in dtypes else dtypes[0], token_counts),
    )


def datasheet_for_gpu(gpu_name: str) -> Datasheet | None:
    """The datasheet of a GPU moeserve knows, from its NVML/torch name; None otherwise."""
    name = gpu_name.upper()
    if "A100" in name and "80GB" in name and "PCIE" not in name:
        return A100_SXM4_80GB
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return H100_SXM5_80GB
    return None


def reference_name_for_gpu(gpu_name: str) -> str | None:
    """The shipped reference profile (a key of REFERENCE_HOSTS) of a GPU from its NVML/torch name; None for a
    GPU moeserve has no datasheet for."""
    sheet = datasheet_for_gpu(gpu_name)
    return next((name for name, host in REFERENCE_HOSTS.items() if host["datasheet"] is sheet), None)
