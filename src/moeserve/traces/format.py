"""ExpertTrace: the one on-disk format of captured routing (docs/trace-format.md).

A trace is one safetensors file: tensors are stored in compact dtypes, metadata as JSON in the
header. Opening a trace reads only the header; each tensor is read (memory-mapped) on first use and
checked against the CRC-32 recorded when it was written, so a truncated or corrupted file is refused.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moeserve import __version__
from moeserve.atomic import atomic_file
from moeserve.errors import MoeServeError

SCHEMA = "moeserve.trace/1"
PREFILL, DECODE = 0, 1

# name -> (required, description); shapes use T tokens, L MoE layers, K top-k, E experts, R requests, H hidden.
TENSORS = {
    "expert_ids": (True, "[T, L, K] uint8 (int16 when E > 256): chosen experts, final (after bias/groups)"),
    "expert_weights": (False, "[T, L, K] float16: the weights the experts' outputs are summed with"),
    "phase": (True, "[T] uint8: 0 = prefill, 1 = decode"),
    "request_offsets": (True, "[R + 1] int64: request r owns tokens offsets[r]:offsets[r+1]"),
    "token_ids": (False, "[T] int32: the token each routing row belongs to"),
    "prefill_activation": (True, "[R, L, E] float32: prefill expert-choice frequencies, rows sum to 1"),
    "decode_activation": (True, "[R, L, E] float32: the same over the request's decode tokens"),
    "prompt_vectors": (False, "[R, H] float32: sum of the prompt's L2-normalised input embeddings"),
    "router_probs": (False, "[T, L, E] float16: full router scores (softmax or sigmoid), when asked for"),
}


@dataclass
class TraceMeta:
    """Everything about a trace that is not a tensor."""

    num_moe_layers: int  # MoE layers (the L axis); files before 0.2 call it num_layers
    num_experts: int
    top_k: int
    moe_layer_indices: list[int]  # decoder-layer index of each L row
    model: str = ""
    geometry: dict | None = None  # ModelGeometry.to_dict() when known
    checkpoint_fingerprint: str | None = None  # models.loading.checkpoint_fingerprint of the traced checkpoint
    tokenizer: str | None = None
    source: str = ""  # where the prompts came from
    generation: dict = field(default_factory=dict)
    prompt_ids: list[str] = field(default_factory=list)
    domains: list[str | None] = field(default_factory=list)
    texts: list[str] | None = None
    schema: str = SCHEMA
    moeserve_version: str = ""
    created: str = ""
    crc32: dict[str, int] = field(default_factory=dict)


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def expert_id_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.int16)


class ExpertTrace:
    """Routing of a set of requests through a MoE model, request after request, token after token."""

    def __init__(self, meta: TraceMeta, tensors: dict[str, np.ndarray] | None = None, path: Path | None = None):
        self.meta = meta
        self._tensors = dict(tensors or {})
        self._path = path
        self._available = set(self._tensors) if path is None else set(meta.crc32)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, meta: TraceMeta, **arrays: np.ndarray) -> ExpertTrace:
        """Build an in-memory trace, converting to the format's dtypes and checking shapes."""
        unknown = set(arrays) - set(TENSORS)
        if unknown:
            raise ValueError(f"unknown trace tensors: {sorted(unknown)}")
        arrays = {k: v for k, v in arrays.items() if v is not None}
        missing = [k for k, (req, _) in TENSORS.items() if req and k not in arrays]
        if missing:
            raise ValueError(f"missing trace tensors: {missing}")
        ids = np.asarray(arrays["expert_ids"])
        if ids.ndim != 3 or ids.shape[1:] != (meta.num_moe_layers, meta.top_k):
            raise MoeServeError(f"expert_ids must be [tokens, {meta.num_moe_layers}, {meta.top_k}], got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= meta.num_experts):
            raise MoeServeError(f"expert ids must lie in [0, {meta.num_experts})")
        dtypes = {
            "expert_ids": expert_id_dtype(meta.num_experts), "expert_weights": np.float16, "phase": np.uint8,
            "request_offsets": np.int64, "token_ids": np.int32, "prefill_activation": np.float32,
            "decode_activation": np.float32, "prompt_vectors": np.float32, "router_probs": np.float16,
        }
        out = {k: np.ascontiguousarray(np.asarray(v).astype(dtypes[k], copy=False)) for k, v in arrays.items()}
        offsets = out["request_offsets"]
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != ids.shape[0] or np.any(np.diff(offsets) < 0):
            raise MoeServeError("request_offsets must start at 0, be non-decreasing and end at the token count")
        for name in ("expert_weights", "phase", "token_ids", "router_probs"):
            if name in out and out[name].shape[0] != ids.shape[0]:
                raise MoeServeError(f"{name} has {out[name].shape[0]} rows for {ids.shape[0]} tokens")
        return cls(meta, out)

    # -- access ---------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._available

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            if not self.has(name):
                raise KeyError(f"this trace has no {name!r} tensor")
            self._tensors[name] = self._read(name)
        return self._tensors[name]

    def _read(self, name: str) -> np.ndarray:

        try:
            with safe_open(str(self._path), framework="numpy") as f:
                array = f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for short or broken files
            raise MoeServeError(f"trace {self._path} is truncated or corrupt ({name}: {exc})") from None
        if _crc32(array) != self.meta.crc32.get(name):
            raise MoeServeError(f"trace {self._path} is corrupt: checksum mismatch in {name}")
        return array

    @property
    def num_requests(self) -> int:
        return len(self["request_offsets"]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self["request_offsets"][-1])

    def request_slice(self, r: int) -> slice:
        off = self["request_offsets"]
        return slice(int(off[r]), int(off[r + 1]))

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (a temp file beside `path`, renamed when complete)."""
        with atomic_file(path) as tmp:
            self.write_to(tmp)
        self._path = Path(path)
        return self._path

    def write_to(self, path: str | Path) -> None:
        """Write the safetensors file at `path` as it is (callers make it atomic: `save`, `OutputSet`)."""


        tensors = {name: self[name] for name in sorted(self._available)}
        self.meta.crc32 = {n: _crc32(t) for n, t in tensors.items()}
        self.meta.moeserve_version = self.meta.moeserve_version or __version__
        self.meta.created = self.meta.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        save_file(tensors, str(path), metadata={"moeserve": json.dumps(asdict(self.meta))})

    @classmethod
    def open(cls, path: str | Path) -> ExpertTrace:
        """Open a trace lazily: only the header is read now."""

        path = Path(path)
        if not path.is_file():
            raise MoeServeError(f"trace not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                names = set(f.keys())
        except Exception as exc:
            raise MoeServeError(f"{path} is not a readable moeserve trace ({str(exc).splitlines()[0]})") from None
        if "moeserve" not in header:
            raise MoeServeError(f"{path} is a safetensors file but not a moeserve trace")
        try:
            raw = json.loads(header["moeserve"])
        except json.JSONDecodeError:
            raise MoeServeError(f"trace {path} has a corrupt header") from None
        if raw.get("schema") != SCHEMA:
            raise MoeServeError(f"trace {path} has schema {raw.get('schema')!r}; this moeserve reads {SCHEMA}")
        if "num_layers" in raw and "num_moe_layers" not in raw:  # the name in traces written before 0.2
            raw["num_moe_layers"] = raw.pop("num_layers")
        meta = TraceMeta(**raw)
        if set(meta.crc32) != names:
            raise MoeServeError(f"trace {path} is corrupt: its tensors do not match its header")
        return cls(meta, path=path)
