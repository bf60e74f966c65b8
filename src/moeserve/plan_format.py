"""The plan: one versioned YAML schema for every strategy, executed by `moeserve serve` (docs/plan-format.md)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from moeserve.atomic import write_text_atomic
from moeserve.errors import MoeServeError
from moeserve.serving.placement import ExpertPlacement, FunctionSpec

SCHEMA = "moeserve.plan/1"


@dataclass
class FunctionPlan:
    """One expert function (a CPU process or serverless function) and the experts of one layer it holds."""

    id: str
    layer: int  # decoder-layer index
    experts: list[int]
    memory_mb: int
    vcpus: float = 0.0
    keep_alive_s: float = 60.0
    group: str = ""  # replicas of the same remote set share a group (Remoe: one group per layer)


@dataclass
class MainPlan:
    """The main function: non-expert modules on `device`, plus the experts it computes itself."""

    device: str  # "gpu" or "cpu"
    local_experts: dict[int, list[int]]  # decoder-layer index -> expert ids computed in the main function
    expert_device: str = "cpu"  # where the main function's experts live ("cpu" in Remoe, "gpu" all-GPU)
    gpu_memory_mb: int = 0
    cpu_memory_mb: int = 0


@dataclass
class Plan:
    strategy: str
    model: str
    geometry: dict  # ModelGeometry.to_dict() of the planned model
    main: MainPlan
    functions: list[FunctionPlan] = field(default_factory=list)
    predicted: dict = field(default_factory=dict)  # ttft_s, tpot_s, cost figures of this plan
    baselines: dict = field(default_factory=dict)  # name -> the same figures for each baseline
    inputs: dict = field(default_factory=dict)  # trace hash, profiles, SLOs, ...
    extra: dict = field(default_factory=dict)  # strategy-specific exports (e.g. MoEless phy2log maps)
    schema: str = SCHEMA
    moeserve_version: str = ""
    created: str = ""

    def placement(self) -> ExpertPlacement:
        """What `serve` executes."""
        placement = ExpertPlacement(
            local={int(k): tuple(v) for k, v in self.main.local_experts.items()},
            functions=tuple(FunctionSpec(f.id, f.layer, tuple(f.experts), f.memory_mb, f.keep_alive_s)
                            for f in self.functions),
        )
        placement.validate(list(self.geometry["moe_layers"]), int(self.geometry["num_experts"]))
        return placement

    def to_yaml(self) -> str:
        from moeserve import __version__

        self.moeserve_version = self.moeserve_version or __version__
        self.created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        return yaml.safe_dump(asdict(self), sort_keys=False, width=120)

    def save(self, path: str | Path) -> Path:
        write_text_atomic(path, self.to_yaml())
        return Path(path)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise MoeServeError(f"plan not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MoeServeError(f"plan {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise MoeServeError(f"{path} is not a {SCHEMA} plan")
    try:
        raw["main"] = MainPlan(**raw["main"])
        raw["main"].local_experts = {int(k): list(v) for k, v in raw["main"].local_experts.items()}
        raw["functions"] = [FunctionPlan(**f) for f in raw.get("functions") or []]
        plan = Plan(**raw)
    except (TypeError, KeyError, AttributeError) as exc:
        raise MoeServeError(f"plan {path} is malformed: {exc}") from None
    plan.placement()  # validates coverage of every expert
    return plan


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
