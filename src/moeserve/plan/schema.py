"""The plan: one versioned YAML schema for every strategy, executed by `moeserve serve` (docs/plan-format.md)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from moeserve import __version__
from moeserve.atomic import write_text_atomic
from moeserve.errors import MoeServeError
from moeserve.plan.placement import ExpertFunction, ExpertPlacement

SCHEMA = "moeserve.plan/1"


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
    functions: list[ExpertFunction] = field(default_factory=list)
    predicted: dict = field(default_factory=dict)  # ttft_s, tpot_s, cost figures of this plan
    baselines: dict = field(default_factory=dict)  # name -> the same figures for each baseline
    inputs: dict = field(default_factory=dict)  # trace hash, profiles, SLOs, ...
    extra: dict = field(default_factory=dict)  # strategy-specific exports (e.g. MoEless phy2log maps)
    checkpoint: dict = field(default_factory=dict)  # {"path", "fingerprint"} of the planned checkpoint
    schema: str = SCHEMA
    moeserve_version: str = ""
    created: str = ""

    def expert_placement(self) -> ExpertPlacement:
        """Where each expert runs: what `serve` executes."""
        placement = ExpertPlacement(
            local={int(k): tuple(v) for k, v in self.main.local_experts.items()},
            functions=tuple(self.functions),
        )
        placement.validate(list(self.geometry["moe_layers"]), int(self.geometry["num_experts"]))
        return placement

    def to_yaml(self) -> str:

        self.moeserve_version = self.moeserve_version or __version__
        self.created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        data = asdict(self)
        data["functions"] = [{**f, "experts": list(f["experts"])} for f in data["functions"]]
        return yaml.safe_dump(data, sort_keys=False, width=120)

    def save(self, path: str | Path) -> Path:
        write_text_atomic(path, self.to_yaml())
        return Path(path)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; anything wrong with it is a one-line MoeServeError."""
    path = Path(path)
    if not path.is_file():
        raise MoeServeError(f"plan not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MoeServeError(f"plan {path} is not a text file") from None
    except yaml.YAMLError as exc:
        raise MoeServeError(f"plan {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise MoeServeError(f"{path} is not a {SCHEMA} plan")
    try:
        raw["main"] = MainPlan(**raw["main"])
        raw["main"].local_experts = {int(k): list(v) for k, v in raw["main"].local_experts.items()}
        raw["functions"] = [ExpertFunction(**f) for f in raw.get("functions") or []]
        plan = Plan(**raw)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise MoeServeError(f"plan {path} is malformed: {exc}") from None
    try:
        _validate(plan)
        plan.expert_placement()  # validates coverage of every expert
    except MoeServeError as exc:
        raise MoeServeError(f"plan {path}: {exc}") from None
    return plan


_FUNCTION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def _number(value, what: str, integer: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or (integer and not isinstance(value, int)):
        raise MoeServeError(f"{what} must be a finite {'whole ' if integer else ''}number >= 0, got {value!r}")


def _ids(values, what: str) -> None:
    if not isinstance(values, list | tuple) or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise MoeServeError(f"{what} must be a list of integers")


def _validate(plan: Plan) -> None:
    """Types and ranges of every field `serve` acts on (coverage is checked by `ExpertPlacement`)."""
    g = plan.geometry
    if not isinstance(g, dict) or not isinstance(g.get("num_experts"), int) or g["num_experts"] < 1:
        raise MoeServeError("geometry.num_experts must be a positive integer")
    _ids(g.get("moe_layers"), "geometry.moe_layers")
    if plan.main.device not in ("gpu", "cpu"):
        raise MoeServeError(f"main.device must be gpu or cpu, got {plan.main.device!r}")
    if plan.main.expert_device not in ("cpu", "gpu", "none"):
        raise MoeServeError(f"main.expert_device must be cpu, gpu or none, got {plan.main.expert_device!r}")
    _number(plan.main.gpu_memory_mb, "main.gpu_memory_mb")
    _number(plan.main.cpu_memory_mb, "main.cpu_memory_mb")
    for layer, experts in plan.main.local_experts.items():
        _ids(experts, f"main.local_experts[{layer}]")
    for f in plan.functions:
        if not isinstance(f.id, str) or not _FUNCTION_ID.match(f.id):
            raise MoeServeError(f"function id {f.id!r} must be 1-128 letters, digits or ._:- characters")
        if not isinstance(f.layer, int) or isinstance(f.layer, bool):
            raise MoeServeError(f"function {f.id}: layer must be an integer")
        _ids(f.experts, f"function {f.id}: experts")
        _number(f.memory_mb, f"function {f.id}: memory_mb")
        _number(f.vcpus, f"function {f.id}: vcpus")
        _number(f.keep_alive_s, f"function {f.id}: keep_alive_s")


# The fields of ModelGeometry that decide whether a plan's placement can run on a model.
_STRUCTURE = ("family", "num_layers", "moe_layers", "num_experts", "top_k", "hidden_size",
              "expert_intermediate_size")


def check_plan_matches_model(plan: Plan, geometry: dict, fingerprint: str | None, model: str) -> None:
    """Refuse to serve a plan made for another model: its geometry must be the model's, and when the
    plan recorded the checkpoint's fingerprint, the checkpoint must be the same one."""
    mine = {k: plan.geometry.get(k) for k in _STRUCTURE}
    theirs = {k: geometry.get(k) for k in _STRUCTURE}
    mine["moe_layers"] = list(mine["moe_layers"] or [])
    theirs["moe_layers"] = list(theirs["moe_layers"] or [])
    diff = [k for k in _STRUCTURE if mine[k] != theirs[k]]
    if diff:
        k = diff[0]
        raise MoeServeError(f"the plan was made for another model ({plan.model}): its {k} is {mine[k]!r}, "
                            f"{model}'s is {theirs[k]!r}")
    planned = (plan.checkpoint or {}).get("fingerprint")
    if planned and fingerprint and planned != fingerprint:
        raise MoeServeError(f"the plan was made for another checkpoint of this architecture "
                            f"({plan.checkpoint.get('path') or plan.model}, fingerprint {planned[:12]}), "
                            f"not {model} ({fingerprint[:12]}): plan this checkpoint with `moeserve plan`")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
