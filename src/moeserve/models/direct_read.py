"""Reading one routed expert from a model directory's safetensors for real, as a memory-limited device must.

`CheckpointExperts` memory-maps the files, so a "read" may be served from the page cache and cost nothing.
`DirectExpertReader` issues the reads itself (os.preadv) on the byte ranges the safetensors header gives
for the expert's tensors, with the page cache out of the way:
- "direct": the file is opened with O_DIRECT; offsets, lengths and the buffer are aligned to 4 KiB, so
  every byte comes from the storage device;
- "dropcache" (when the filesystem refuses O_DIRECT): the range's cached pages are dropped with
  posix_fadvise(POSIX_FADV_DONTNEED) before an ordinary read. Pages that another mapping of the file
  keeps resident cannot be dropped; O_DIRECT has no such hole.
`bytes_read` counts what the reads returned (aligned lengths included), `read_s` their wall time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeserve.errors import MoeServeError
from moeserve.models.checkpoint import CheckpointExperts
from moeserve.models.expert_ffn import ExpertLayout, ExpertWeights

ALIGN = 4096
MODES = ("auto", "direct", "dropcache")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class TensorSpan:
    """Where a tensor's bytes lie: absolute file offset, length, dtype and shape."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_spans(path: Path) -> dict[str, TensorSpan]:
    """key -> TensorSpan of every tensor in one safetensors file (its 8-byte length + JSON header)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    start = 8 + header_len
    spans = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise MoeServeError(f"{path}: tensor {key} has dtype {info['dtype']}, which the expert cache cannot read")
        lo, hi = info["data_offsets"]
        spans[key] = TensorSpan(path, start + lo, hi - lo, _DTYPES[info["dtype"]], tuple(info["shape"]))
    return spans


class DirectExpertReader:
    """Reads experts with the page cache bypassed (see the module docstring). Thread-safe."""

    def __init__(self, model_dir: str | os.PathLike, mode: str = "auto"):
        if mode not in MODES:
            raise MoeServeError(f"unknown read mode {mode!r}: use {', '.join(MODES)}")
        self.checkpoint = CheckpointExperts(model_dir)
        self._spans: dict[str, TensorSpan] = {}
        for path in sorted(set(self.checkpoint._files.values())):
            self._spans.update(safetensors_spans(path))
        self.mode = "direct" if mode in ("auto", "direct") else "dropcache"
        self._auto = mode == "auto"
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0
        self.read_s = 0.0

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                flags = os.O_RDONLY | (os.O_DIRECT if self.mode == "direct" else 0)
                try:
                    fd = os.open(path, flags)
                except OSError:
                    if not (self._auto and self.mode == "direct"):
                        raise
                    self.mode = "dropcache"
                    fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def expert_spans(self, layer: int, expert: int) -> dict[str, TensorSpan]:
        """key -> the span of expert `expert`'s bytes in it (a fused [E, ...] tensor's row e)."""
        whole, fused = self.checkpoint.expert_keys(layer, expert)
        spans = {k: self._spans[k] for k in whole}
        for key in fused:
            s = self._spans[key]
            if not 0 <= expert < s.shape[0]:
                raise MoeServeError(f"{self.checkpoint.model_dir}: expert {expert} is out of range for {key}")
            row = s.nbytes // s.shape[0]
            spans[key] = TensorSpan(s.path, s.offset + expert * row, row, s.dtype, s.shape[1:])
        return spans

    def read_range(self, path: Path, offset: int, nbytes: int) -> tuple[memoryview, int]:
        """Bytes [offset, offset + nbytes) of `path`, read now -> (a view of them, bytes the read returned)."""
        lo = offset // ALIGN * ALIGN
        hi = -(-(offset + nbytes) // ALIGN) * ALIGN
        buf = mmap.mmap(-1, hi - lo)  # page aligned, as O_DIRECT needs
        fd = self._fd(path)
        t0 = time.perf_counter()
        if self.mode == "dropcache":
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        try:
            got = os.preadv(fd, [buf], lo)
        except OSError:
            if not (self._auto and self.mode == "direct"):
                raise
            self._fall_back()
            return self.read_range(path, offset, nbytes)
        elapsed = time.perf_counter() - t0
        if got < offset + nbytes - lo:
            raise MoeServeError(f"{path}: short read at byte {offset} (the file is truncated?)")
        with self._lock:
            self.bytes_read += got
            self.reads += 1
            self.read_s += elapsed
        return memoryview(buf)[offset - lo: offset - lo + nbytes], got

    def _fall_back(self) -> None:
        """O_DIRECT opened but a read was refused (alignment): drop the page cache instead, from now on."""
        self.close()
        with self._lock:
            self.mode = "dropcache"

    def read(self, layer: int, expert: int, layout: ExpertLayout, dtype: torch.dtype | None = None,
             pin: bool = False) -> tuple[ExpertWeights, int]:
        """One expert's weights, read from storage now (one read per file when its tensors lie close
        together), in `nn.Linear` orientation, cast to `dtype`, owning their memory (`pin`: in pinned
        host memory, for a copy to a GPU) -> (weights, bytes read)."""
        spans = self.expert_spans(layer, expert)
        tensors: dict[str, torch.Tensor] = {}
        total = 0
        for path in {s.path for s in spans.values()}:
            group = {k: s for k, s in spans.items() if s.path == path}
            lo = min(s.offset for s in group.values())
            hi = max(s.offset + s.nbytes for s in group.values())
            if hi - lo <= 2 * sum(s.nbytes for s in group.values()) + 2 * ALIGN:
                view, got = self.read_range(path, lo, hi - lo)
                total += got
                for k, s in group.items():
                    tensors[k] = _tensor(view[s.offset - lo: s.offset - lo + s.nbytes], s, pin)
            else:
                for k, s in group.items():
                    view, got = self.read_range(path, s.offset, s.nbytes)
                    total += got
                    tensors[k] = _tensor(view, s, pin)
        weights = self.checkpoint._assemble(layer, expert, layout, dtype, tensors.__getitem__,
                                            lambda key, e: tensors[key])
        return weights, total


def _tensor(view: memoryview, span: TensorSpan, pin: bool) -> torch.Tensor:
    """A tensor owning a copy of `view`'s bytes (the read buffer is released after the read)."""
    src = torch.frombuffer(view, dtype=torch.uint8).view(span.dtype).reshape(span.shape)
    out = torch.empty(span.shape, dtype=span.dtype, pin_memory=pin)
    return out.copy_(src)
