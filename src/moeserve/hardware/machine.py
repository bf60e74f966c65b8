"""Describe the machine a profile is measured on: CPU, RAM, GPUs, software versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import psutil
import torch
import transformers

from moeserve.hardware.schema import GpuInfo, MachineInfo


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name from /proc/cpuinfo (x86 `model name`, else Arm's `Hardware`/`Model`)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def available_cpus() -> int:
    """Logical CPUs this process may run on (the affinity mask, which containers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def nvml_gpus() -> tuple[GpuInfo, ...]:
    """Name and memory of each NVIDIA GPU via NVML; () when there is no driver or no nvidia-ml-py."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError: no driver / no device
        return ()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(GpuInfo(name=name, memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return tuple(gpus)
    except Exception:
        return ()
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _torch_gpus() -> tuple[GpuInfo, ...]:
    if not torch.cuda.is_available():
        return ()
    return tuple(
        GpuInfo(name=torch.cuda.get_device_name(i), memory_bytes=int(torch.cuda.get_device_properties(i).total_memory))
        for i in range(torch.cuda.device_count())
    )


def detected_gpus() -> tuple[GpuInfo, ...]:
    """This machine's GPUs (NVML, else torch); () without one."""
    return nvml_gpus() or _torch_gpus()


def describe_machine() -> MachineInfo:
    """This machine, now."""
    try:

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return MachineInfo(
        cpu_model=cpu_model(),
        cpu_cores=available_cpus(),
        ram_bytes=int(psutil.virtual_memory().total),
        gpus=detected_gpus(),
        torch_version=str(torch.__version__),
        transformers_version=transformers_version,
        python_version=platform.python_version() or sys.version.split()[0],
        platform=platform.platform(),
        date=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    )
