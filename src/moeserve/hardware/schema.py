"""The hardware profile: what each piece of MoE serving work costs on one machine class.

One YAML document, schema version `SCHEMA_VERSION`, described field by field in docs/profiles.md.
Every section says how its numbers were obtained (`method`): "measured" on the machine,
"datasheet" (vendor figures) or "estimated" (derived from datasheet figures by a stated model).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.hardware.fit import CurveFit

SCHEMA_VERSION = 1
METHODS = ("measured", "datasheet", "estimated", "extrapolated")
DEVICES = ("cpu", "cuda")
PHASES = ("prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MoeServeError(message)


def _check_points(x: tuple, seconds: tuple, what: str) -> None:
    _check(len(x) == len(seconds) and len(x) > 0, f"{what}: needs as many x values as seconds (and at least one)")
    _check(all(b > a for a, b in zip(x[:-1], x[1:], strict=True)), f"{what}: x values must be strictly increasing")
    _check(all(s > 0 and math.isfinite(s) for s in seconds), f"{what}: seconds must be positive and finite")


def _check_method(method: str, what: str) -> None:
    _check(method in METHODS, f"{what}: method must be one of {', '.join(METHODS)}, got {method!r}")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class MachineInfo:
    """Where the profile was measured (or, for a reference profile, which machine it describes)."""

    cpu_model: str
    cpu_cores: int  # logical CPUs this process may run on
    ram_bytes: int
    gpus: tuple[GpuInfo, ...] = ()
    torch_version: str | None = None
    transformers_version: str | None = None
    python_version: str | None = None
    platform: str | None = None
    date: str | None = None  # ISO 8601, UTC


@dataclass(frozen=True)
class Datasheet:
    """Vendor peak figures of the accelerator and its links. Bandwidths in bytes/s, per direction."""

    gpu_name: str
    gpu_memory_bytes: int
    gpu_memory_bandwidth_bytes_per_s: float
    dense_tflops: dict[str, float]  # dtype -> peak dense TFLOP/s (no 2:4 sparsity), e.g. {"bfloat16": 312}
    host_link: str  # e.g. "PCIe 4.0 x16"
    host_link_bandwidth_bytes_per_s: float
    nvlink_bandwidth_bytes_per_s: float | None = None  # total per GPU, both directions
    method: str = "datasheet"

    def __post_init__(self):
        _check_method(self.method, "datasheet")


@dataclass(frozen=True)
class ExpertCurve:
    """Latency of one SwiGLU expert, y = down(silu(gate x) * up x), vs tokens routed to it.

    tokens: [N], seconds: [N] (the fastest of the repeats; profiles before 0.2 kept the median), spread:
    [N] p90 / fastest - 1 per point (empty in older profiles). threads: CPU intra-op threads (None on CUDA).
    """

    device: str
    threads: int | None
    dtype: str
    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    fit: CurveFit
    method: str = "measured"
    spread: tuple[float, ...] = ()

    def __post_init__(self):
        what = f"expert curve ({self.device}, {self.threads} threads, {self.dtype})"
        _check(self.device in DEVICES, f"{what}: device must be cpu or cuda")
        _check(self.device != "cpu" or (self.threads or 0) >= 1, f"{what}: a CPU curve needs threads >= 1")
        _check_method(self.method, what)
        _check_points(self.tokens, self.seconds, what)


@dataclass(frozen=True)
class ExpertSection:
    """Per-expert FFN latency for one expert geometry, at each (device, threads, dtype) measured."""

    hidden_size: int
    intermediate_size: int
    curves: tuple[ExpertCurve, ...]


@dataclass(frozen=True)
class NonExpertCurve:
    """Per-layer latency of everything but the routed experts (attention, norms, router, shared experts).

    prefill: x = prompt length of one sequence; decode: x = batch size, one new token per sequence with
    `context_len` tokens already in the KV cache. seconds_per_layer: [N] = whole forward / num_layers.
    """

    phase: str
    device: str
    threads: int | None
    dtype: str
    x: tuple[int, ...]
    seconds_per_layer: tuple[float, ...]
    fit: CurveFit
    context_len: int | None = None
    method: str = "measured"
    spread: tuple[float, ...] = ()  # p90 / fastest - 1 per point

    def __post_init__(self):
        what = f"non-expert {self.phase} curve"
        _check(self.phase in PHASES, f"{what}: phase must be prefill or decode")
        _check(self.device in DEVICES, f"{what}: device must be cpu or cuda")
        _check_method(self.method, what)
        _check_points(self.x, self.seconds_per_layer, what)


@dataclass(frozen=True)
class NonExpertSection:
    model: str  # model class / config name the curves were measured on
    num_layers: int
    curves: tuple[NonExpertCurve, ...]


@dataclass(frozen=True)
class CopyCurve:
    """Host<->GPU copy time vs size. direction: h2d or d2h; pinned: page-locked host buffer.

    nbytes: [N], seconds: [N]; latency_s and bandwidth_bytes_per_s from the line a + nbytes / bandwidth.
    """

    direction: str
    pinned: bool
    nbytes: tuple[int, ...]
    seconds: tuple[float, ...]
    latency_s: float
    bandwidth_bytes_per_s: float
    method: str = "measured"

    def __post_init__(self):
        what = f"copy curve ({self.direction}, pinned={self.pinned})"
        _check(self.direction in ("h2d", "d2h"), f"{what}: direction must be h2d or d2h")
        _check_method(self.method, what)
        _check_points(self.nbytes, self.seconds, what)
        _check(self.bandwidth_bytes_per_s > 0, f"{what}: bandwidth must be positive")


@dataclass(frozen=True)
class TransportCurve:
    """Round trip of one batch of hidden states to another local process and back.

    mechanism: how the bytes travel (shared memory buffers + a small control message over a pipe).
    tokens: [N] (batch rows of hidden_size values of dtype), nbytes: [N] one-way payload, seconds: [N]
    for the whole round trip (copy in, notify, peer copies, notify back, copy out). fit is over nbytes.
    """

    mechanism: str
    hidden_size: int
    dtype: str
    tokens: tuple[int, ...]
    nbytes: tuple[int, ...]
    seconds: tuple[float, ...]
    fit: CurveFit
    method: str = "measured"

    def __post_init__(self):
        _check_method(self.method, "transport")
        _check(len(self.tokens) == len(self.nbytes), "transport: needs as many tokens as nbytes values")
        _check_points(self.nbytes, self.seconds, "transport")


@dataclass(frozen=True)
class MeasurementConditions:
    """How quiet the machine was while the profile was measured, and whether its figures can be trusted.

    load_*: 1-minute load average before and after; other_cpus: other processes' CPU time over the
    measurement's wall time; max_spread / median_spread over every measured point
    (p90 / fastest - 1); unreliable with the reasons when the load exceeded the CPUs the measurement had to
    itself or the repeats spread widely (the fastest repeat is kept, but under load even it is slow)."""

    cpus: int
    load_before: float
    load_after: float
    median_spread: float
    max_spread: float
    unreliable: bool
    reasons: tuple[str, ...] = ()
    other_cpus: float | None = None  # CPUs other processes kept busy, on average (None: unknown, or before 0.2)


@dataclass(frozen=True)
class ModuleMemory:
    """Bytes of the model's parts (given by the model adapter) and the measuring process's RSS."""

    non_expert_bytes: int | None = None
    expert_bytes: int | None = None  # one routed expert
    all_experts_bytes: int | None = None  # every routed expert of every layer
    process_rss_bytes: int | None = None


@dataclass(frozen=True)
class HardwareProfile:
    """A machine class's costs. Sections that were not measured are None / empty."""

    name: str
    source: str
    machine: MachineInfo
    expert: ExpertSection
    notes: str = ""
    datasheet: Datasheet | None = None
    non_expert: NonExpertSection | None = None
    copy: tuple[CopyCurve, ...] = ()
    transport: TransportCurve | None = None
    memory: ModuleMemory = field(default_factory=ModuleMemory)
    conditions: MeasurementConditions | None = None  # None: a reference profile, or one measured before 0.2
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        _check(self.schema_version == SCHEMA_VERSION,
               f"hardware profile schema_version {self.schema_version} is not supported (this moeserve reads "
               f"version {SCHEMA_VERSION}): re-create it with `moeserve profile --hardware`")

    # ---- lookups the planners use -------------------------------------------------------------

    def expert_curve(self, threads: int | None = None, device: str = "cpu", dtype: str | None = None) -> ExpertCurve:
        """The expert curve for (device, dtype) at `threads` (None: the most threads measured; a count
        that was not measured: the nearest one measured, the smaller on a tie)."""
        curves = [c for c in self.expert.curves if c.device == device and (dtype is None or c.dtype == dtype)]
        if not curves:
            have = sorted({(c.device, c.dtype) for c in self.expert.curves})
            raise MoeServeError(f"hardware profile {self.name!r} has no expert latency for device={device} "
                                f"dtype={dtype or 'any'} (it has {have or 'none'})")
        if dtype is None:
            curves = [c for c in curves if c.dtype == curves[0].dtype]
        if device != "cpu":
            return curves[0]
        if threads is None:
            return max(curves, key=lambda c: c.threads)
        return min(curves, key=lambda c: (abs(c.threads - threads), c.threads))

    def expert_latency_s(self, tokens, threads: int | None = None, device: str = "cpu", dtype: str | None = None):
        """Seconds for one expert to process `tokens` tokens (scalar or array; 0 tokens costs 0)."""
        t = self.expert_curve(threads, device, dtype).fit(tokens)
        return _zero_where_empty(t, tokens)

    def non_expert_latency_s(self, phase: str, n, device: str | None = None, threads: int | None = None,
                             dtype: str | None = None):
        """Seconds per decoder layer outside the routed experts. prefill: n = prompt tokens;
        decode: n = batch size (one token per sequence). Scalar or array n."""
        if phase not in PHASES:
            raise MoeServeError(f"phase must be prefill or decode, got {phase!r}")
        curves = [] if self.non_expert is None else [
            c for c in self.non_expert.curves
            if c.phase == phase and (device is None or c.device == device) and (dtype is None or c.dtype == dtype)
        ]
        if not curves:
            raise MoeServeError(f"hardware profile {self.name!r} has no non-expert {phase} latency"
                                f"{f' on {device}' if device else ''}: measure it with a model "
                                "(`moeserve profile --hardware --model ...`)")
        if threads is not None and curves[0].threads is not None:
            curves.sort(key=lambda c: (abs((c.threads or 0) - threads), c.threads or 0))
        else:
            curves.sort(key=lambda c: -(c.threads or 0))
        return _zero_where_empty(curves[0].fit(n), n)

    def transport_round_trip_s(self, nbytes):
        """Seconds to send `nbytes` of hidden states to a local peer process and get as many back."""
        if self.transport is None:
            raise MoeServeError(f"hardware profile {self.name!r} has no inter-process transport measurement")
        return self.transport.fit(nbytes)

    def copy_s(self, nbytes, direction: str = "h2d", pinned: bool = True):
        """Seconds to copy `nbytes` between host and GPU (latency + nbytes / bandwidth)."""
        match = [c for c in self.copy if c.direction == direction and c.pinned == pinned]
        if not match:
            raise MoeServeError(f"hardware profile {self.name!r} has no {direction} copy figure "
                                f"({'pinned' if pinned else 'pageable'} memory)")
        c = match[0]
        t = c.latency_s + np.asarray(nbytes, dtype=np.float64) / c.bandwidth_bytes_per_s
        return float(t) if np.ndim(nbytes) == 0 else t

    # ---- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain dict/list/scalar form, in schema order (what the YAML file holds)."""
        data = _to_plain(self)
        first = ("schema_version", "name", "source", "notes", "machine", "datasheet")
        return {**{k: data.pop(k) for k in first}, **data}


def _zero_where_empty(t, n):
    if np.ndim(n) == 0:
        return 0.0 if n <= 0 else t
    return np.where(np.asarray(n) <= 0, 0.0, t)


# ---- dict <-> dataclass, with validation ------------------------------------------------------------

def _to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)  # plain str, not a subclass such as torch's TorchVersion
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def from_plain(tp, value, where: str):
    """Build an instance of type `tp` from YAML-loaded `value`, or raise MoeServeError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        _check(value is not None, f"{where}: must not be null")
        return from_plain(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        _check(not unknown, f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name not in value:
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                _check(not required, f"{where}: missing field {f.name!r}")
                continue
            kwargs[f.name] = from_plain(hints[f.name], value[f.name], f"{where}.{f.name}" if where else f.name)
        try:
            return tp(**kwargs)
        except MoeServeError as exc:
            raise MoeServeError(f"{where or 'profile'}: {exc}") from None
    if origin is tuple:
        _check(isinstance(value, list), f"{where}: expected a list, got {type(value).__name__}")
        (item_type, _) = typing.get_args(tp)
        return tuple(from_plain(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _check(isinstance(value, dict), f"{where}: expected a mapping, got {type(value).__name__}")
        key_type, item_type = typing.get_args(tp)
        return {str(k): from_plain(item_type, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported schema type {_type_name(tp)}")


def profile_from_dict(data) -> HardwareProfile:
    """Validate a YAML-loaded document and build the profile (MoeServeError on any problem)."""
    _check(isinstance(data, dict), "a hardware profile must be a YAML mapping")
    version = data.get("schema_version")
    _check(version is not None, "missing field 'schema_version'")
    _check(version == SCHEMA_VERSION,
           f"schema_version {version!r} is not supported (this moeserve reads version {SCHEMA_VERSION}): "
           "re-create the profile with `moeserve profile --hardware`")
    return from_plain(HardwareProfile, data, "")
