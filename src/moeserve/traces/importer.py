"""Import routing captured elsewhere (e.g. vLLM's `--enable-return-routed-experts`) as an ExpertTrace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.models.geometry import inspect_model
from moeserve.models.loading import checkpoint_fingerprint
from moeserve.traces.activation import activation_matrix
from moeserve.traces.format import DECODE, PREFILL, ExpertTrace, TraceMeta


def routing_to_trace(
    routing: np.ndarray, request_offsets: np.ndarray, num_experts: int, *, prompt_lengths: np.ndarray | None = None,
    moe_layer_indices: list[int] | None = None, geometry: dict | None = None, domains: list | None = None,
    source: str = "",
) -> ExpertTrace:
    """routing: [T, L, K] int expert ids; request_offsets: [R + 1]; prompt_lengths: [R] prefill tokens
    per request (without them every token counts as prefill, and the trace says so)."""
    routing = np.asarray(routing)
    if routing.ndim != 3 or routing.shape[0] == 0:
        raise MoeServeError(f"routing must be a non-empty [tokens, layers, top_k] array, got shape {routing.shape}")
    if not np.issubdtype(routing.dtype, np.integer):
        raise MoeServeError(f"routing must hold integer expert ids, got {routing.dtype}")
    if routing.min() < 0 or routing.max() >= num_experts:
        raise MoeServeError(f"expert ids lie in [{routing.min()}, {routing.max()}], outside [0, {num_experts})")
    offsets = np.asarray(request_offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(routing) or (
        np.diff(offsets) <= 0
    ).any():
        raise MoeServeError(f"request offsets must rise strictly from 0 to {len(routing)} (the token count)")
    r, (t, layers, k) = len(offsets) - 1, routing.shape
    phase = np.full(t, PREFILL, dtype=np.uint8)
    if prompt_lengths is not None:
        prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
        if prompt_lengths.shape != (r,) or (prompt_lengths < 1).any() or (prompt_lengths > np.diff(offsets)).any():
            raise MoeServeError("prompt lengths must be one per request, each between 1 and the request's tokens")
        for i in range(r):
            phase[offsets[i] + prompt_lengths[i] : offsets[i + 1]] = DECODE
    pre = np.stack([activation_matrix(routing[offsets[i] : offsets[i + 1]][phase[offsets[i] : offsets[i + 1]] == 0],
                                      num_experts) for i in range(r)])
    dec = np.stack([activation_matrix(routing[offsets[i] : offsets[i + 1]][phase[offsets[i] : offsets[i + 1]] == 1],
                                      num_experts) for i in range(r)])
    meta = TraceMeta(
        num_moe_layers=layers, num_experts=num_experts, top_k=k,
        moe_layer_indices=list(moe_layer_indices) if moe_layer_indices else list(range(layers)),
        geometry=geometry, source=source, prompt_ids=[f"request/{i}" for i in range(r)],
        domains=list(domains) if domains is not None else [None] * r,
        generation={"imported": True, "phase_known": prompt_lengths is not None},
    )
    return ExpertTrace.from_arrays(meta, expert_ids=routing, phase=phase, request_offsets=offsets,
                                   prefill_activation=pre, decode_activation=dec)


def read_array(path: str | Path, what: str) -> np.ndarray:
    """A 1-D or N-D array from .npy, .txt (whitespace numbers) or .json (a list)."""
    path = Path(path)
    if not path.is_file():
        raise MoeServeError(f"{what} file not found: {path}")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".json":
            return np.asarray(json.loads(path.read_text()))
        return np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (ValueError, json.JSONDecodeError) as exc:
        raise MoeServeError(f"cannot read {what} from {path}: {str(exc).splitlines()[0]}") from None


def read_routing_file(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A .npy routing array, or a .npz with `routed_experts` plus optional `request_offsets`,
    `request_lengths` and `prompt_lengths`."""
    path = Path(path)
    if not path.is_file():
        raise MoeServeError(f"routing file not found: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "routed_experts" not in z:
                    raise MoeServeError(f"{path} has no 'routed_experts' array (found: {', '.join(z.files)})")
                return z["routed_experts"], {k: z[k] for k in z.files if k != "routed_experts"}
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), {}
    except (ValueError, OSError) as exc:
        raise MoeServeError(f"cannot read routing from {path}: {str(exc).splitlines()[0]}") from None
    raise MoeServeError(f"routing must be a .npy or .npz file, got {path.name}")


def import_routing(routing: Path, out: Path, *, offsets: Path | None = None, lengths: Path | None = None,
                   prompt_lengths: Path | None = None, num_experts: int | None = None, model: str | None = None
                   ) -> ExpertTrace:
    """`moeserve trace import`: routing [tokens, layers, top_k] from a .npy/.npz file, request boundaries
    from --offsets or --lengths (or the .npz), the geometry from --model's config -> a trace saved at `out`."""
    array, extra = read_routing_file(routing)
    geometry, layer_idx = None, None
    if model:
        g = inspect_model(model)
        geometry, layer_idx = g.to_dict(), list(g.moe_layers)
        if num_experts is not None and num_experts != g.num_experts:
            raise MoeServeError(f"--num-experts {num_experts} contradicts the model's {g.num_experts}")
        num_experts = g.num_experts
        if array.ndim == 3 and array.shape[1:] != (g.num_moe_layers, g.top_k):
            raise MoeServeError(f"routing is [.., {array.shape[1]}, {array.shape[2]}] but the model has "
                                f"{g.num_moe_layers} MoE layers and top-{g.top_k}")
    if num_experts is None:
        raise MoeServeError("give --num-experts or --model so the expert count is known")
    if offsets is not None:
        off = read_array(offsets, "offsets")
    elif lengths is not None:
        off = np.concatenate([[0], np.cumsum(read_array(lengths, "lengths"))])
    elif "request_offsets" in extra:
        off = extra["request_offsets"]
    elif "request_lengths" in extra:
        off = np.concatenate([[0], np.cumsum(extra["request_lengths"])])
    else:
        raise MoeServeError("give --offsets or --lengths (request boundaries)")
    pl = read_array(prompt_lengths, "prompt lengths") if prompt_lengths else extra.get("prompt_lengths")
    trace = routing_to_trace(array, off, num_experts, prompt_lengths=pl, moe_layer_indices=layer_idx,
                             geometry=geometry, source=str(routing))
    if model:
        trace.meta.model = str(model)
        trace.meta.checkpoint_fingerprint = checkpoint_fingerprint(model)
    trace.save(out)
    return trace
