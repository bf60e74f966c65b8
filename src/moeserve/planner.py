"""Planning a trace: the profiles and prices a strategy needs, then Remoe or MoEless (`moeserve plan`), and
the plan `serve` makes on the spot when it is given none.

Above remoe/ and moeless/ (it chooses between them), below engine/ (which plans on the spot).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeserve import defaults
from moeserve.errors import MoeServeError
from moeserve.hardware import available_hardware_profiles, load_hardware_profile
from moeserve.hardware.from_config import extrapolation_notes
from moeserve.hardware.machine import detected_gpus
from moeserve.hardware.reference import reference_name_for_gpu
from moeserve.hardware.schema import HardwareProfile
from moeserve.models.geometry import ModelGeometry, inspect_model
from moeserve.models.loading import (
    checkpoint_fingerprint,
    load_input_embeddings,
    load_model,
    load_tokenizer,
)
from moeserve.moeless.deployment import fleet_for, plan_moeless_from_trace
from moeserve.plan.schema import Plan
from moeserve.pricing.profiles import load_pricing
from moeserve.remoe.cost import CostModel
from moeserve.remoe.deployment import plan_remoe_from_trace
from moeserve.remoe.from_profiles import linear_latency, plan_hardware, plan_model
from moeserve.remoe.inputs import Slo
from moeserve.traces.activation import prompt_vector
from moeserve.traces.format import ExpertTrace
from moeserve.traces.record import build_trace
from moeserve.traces.synth import trace_geometry
from moeserve.workloads import load_arrivals, load_prompts

log = logging.getLogger("moeserve.planning")


@dataclass(frozen=True)
class PlanOptions:
    """What `moeserve plan` plans. Remoe: SLOs, the CPU and GPU hardware profiles, pricing (one CPU and one
    GPU offering), optionally one request's `prompt` (SPS); MoEless: devices, extra replicas per layer
    (None: a quarter of the experts), scheduling window and the arrival trace the requests are given."""

    trace: Path
    strategy: str = "remoe"
    hardware: str = defaults.CPU_HARDWARE
    gpu_hardware: str = defaults.GPU_HARDWARE
    pricing: tuple[str, ...] = defaults.PRICING
    slo_ttft_s: float = defaults.SLO_TTFT_S
    slo_tpot_s: float = defaults.SLO_TPOT_S
    confidence: float = defaults.CONFIDENCE
    prompt: str | None = None
    network_rtt_s: float | None = None
    keep_alive_s: float = defaults.KEEP_ALIVE_S
    gpus: int = 8
    replica_budget: int | None = None
    window_s: float = 5.0
    arrivals: str = "azure-conv"
    evaluate: bool = False
    seed: int = 0
    model: str | None = None  # a card or config-only directory whose geometry the plan uses (traces/synth.py)


def open_planned_trace(path: Path, model: str | None = None) -> tuple[ExpertTrace, ModelGeometry, list[str]]:
    """A trace a plan can be made from: not empty, with the model's geometry (the trace's own, or `model`'s);
    and notes on it (a synthetic trace)."""
    trace = ExpertTrace.open(path)
    if trace.num_requests == 0 or trace.num_tokens == 0:
        raise MoeServeError(f"trace {path} is empty")
    return trace, *trace_geometry(trace, model)


def plan_trace(options: PlanOptions) -> tuple[Plan, dict]:
    """Plan the trace with the options' strategy -> (the plan, a report: evaluation or MoEless replay)."""
    if options.strategy not in ("remoe", "moeless"):
        raise MoeServeError(f"unknown strategy {options.strategy!r}: use remoe or moeless")
    trace, geometry, trace_notes = open_planned_trace(options.trace, options.model)
    if options.strategy == "moeless":
        return _plan_moeless(options, trace, geometry)
    prices = load_pricing(*options.pricing)
    cpu, (gpu, gpu_note) = load_hardware_profile(options.hardware), resolve_gpu_hardware(options.gpu_hardware)
    hw = plan_hardware(geometry, cpu, gpu, prices, network_rtt_s=options.network_rtt_s)
    cost_model = CostModel.build(plan_model(geometry), hw, prices, gpu_available=gpu is not None)
    vector = None if options.prompt is None else _prompt_vector(trace.meta.model, options.prompt)
    inputs = {"hardware": cpu.name, "gpu_hardware": "none" if gpu is None else gpu.name,
              "pricing": list(options.pricing), "network_rtt_s": hw.network_rtt_s}
    slo = Slo(options.slo_ttft_s, options.slo_tpot_s, delta=1 - options.confidence)
    plan, report = plan_remoe_from_trace(options.trace, trace, geometry, cost_model, slo, inputs=inputs,
                                         prompt_vector=vector, keep_alive_s=options.keep_alive_s,
                                         evaluate=options.evaluate, seed=options.seed)
    profiles = [cpu, *([gpu] if gpu else [])]
    plan.extra.setdefault("notes", []).extend([gpu_note] + profile_warnings(*profiles) + extrapolation_notes(*profiles)
                                              + trace_notes)
    return plan, report


def resolve_gpu_hardware(name: str) -> tuple[HardwareProfile | None, str]:
    """The GPU profile a plan is costed with, and a note saying where it came from. "auto": the detected GPU's
    shipped reference profile, else none; "none": no GPU (CPU-only shapes); otherwise a profile name or path."""
    if name == "none":
        return None, "GPU side absent: --gpu-hardware none"
    if name != "auto":
        return load_hardware_profile(name), f"GPU costed with the {name} profile (--gpu-hardware)"
    gpus = detected_gpus()
    if not gpus:
        return None, ("GPU side absent: no GPU detected (--gpu-hardware auto); name a GPU profile (e.g. "
                      "--gpu-hardware a100-80gb) to plan for one")
    ref = reference_name_for_gpu(gpus[0].name)
    if ref is None:
        return None, (f"GPU side absent: the detected {gpus[0].name} has no shipped profile (--gpu-hardware auto); "
                      "name a GPU profile (a100-80gb, h100-sxm, or a YAML path) to plan for it")
    return load_hardware_profile(ref), f"detected {gpus[0].name}: GPU costed with the {ref} profile"


def profile_warnings(*profiles: HardwareProfile) -> list[str]:
    """Notes for a plan made from profiles measured on a loaded machine."""
    return [f"hardware profile {p.name} was measured under load ({'; '.join(p.conditions.reasons)}): its latencies "
            f"may be off, and so may this plan; measure it again on a quiet machine (`moeserve profile MODEL "
            "--hardware`)" for p in profiles if p.conditions is not None and p.conditions.unreliable]


def _prompt_vector(model: str, prompt: str):
    ids = load_tokenizer(model)(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise MoeServeError("--prompt tokenised to zero tokens")
    return prompt_vector(load_input_embeddings(model)[ids])


def _plan_moeless(options: PlanOptions, trace: ExpertTrace, geometry: ModelGeometry) -> tuple[Plan, dict]:
    profile = load_hardware_profile(options.hardware)
    curve = profile.expert_curve(device="cpu", dtype="float32")
    fit = linear_latency(curve.tokens, curve.seconds)  # least squares, clipped to non-negative
    prices = load_pricing(*options.pricing)
    extra = options.replica_budget
    if extra is None:  # a quarter of the experts, rounded up so that EPLB's slots split evenly over the devices
        extra = geometry.num_experts // 4
        extra += -(geometry.num_experts + extra) % options.gpus
    fleet = fleet_for(geometry, options.gpus, extra, fit.fixed_s, fit.per_token_s, prices.cpu.usd_per_gb_second)
    return plan_moeless_from_trace(
        options.trace, trace, geometry, fleet, extra, load_arrivals(options.arrivals).arrival_s, options.window_s,
        options.keep_alive_s, {"hardware": profile.name, "pricing": list(options.pricing), "devices": options.gpus,
                               "replica_budget": extra, "arrivals": options.arrivals})


def matching_hardware_profile(hidden_size: int, intermediate_size: int) -> HardwareProfile | None:
    """The first shipped hardware profile measured for this expert shape with non-expert figures, or None."""
    for name in available_hardware_profiles():
        profile = load_hardware_profile(name)
        e = profile.expert
        if e is not None and (e.hidden_size, e.intermediate_size) == (hidden_size, intermediate_size) \
                and profile.non_expert is not None and profile.datasheet is None:
            return profile
    return None


def plan_on_the_spot(model_spec: str, *, prompts: str = "builtin:mixed", max_prompts: int = 32, gen_tokens: int = 8,
                     slo_ttft_s: float = defaults.SLO_TTFT_S, slo_tpot_s: float = defaults.SLO_TPOT_S) -> Plan | None:
    """What `serve` does without a plan: profile `max_prompts` real prompts, plan with Remoe; None when no
    shipped hardware profile matches the model's expert shape. Nothing is left on disk."""
    g = inspect_model(model_spec)
    cpu = matching_hardware_profile(g.hidden_size, g.expert_intermediate_size)
    if cpu is None:
        return None
    model, tokenizer = load_model(model_spec), load_tokenizer(model_spec)
    trace = build_trace(model, tokenizer, load_prompts(prompts, max_prompts=max_prompts), gen_tokens=gen_tokens,
                        batch_size=8, model_name=str(model_spec), source=prompts, geometry=g.to_dict(),
                        fingerprint=checkpoint_fingerprint(model_spec))
    prices = load_pricing(*defaults.PRICING)
    gpu, gpu_note = resolve_gpu_hardware(defaults.GPU_HARDWARE)
    cost_model = CostModel.build(plan_model(g), plan_hardware(g, cpu, gpu, prices), prices, gpu_available=gpu is not None)
    with tempfile.TemporaryDirectory(prefix="moeserve-spot-") as folder:  # the plan records the trace's hash
        trace_path = trace.save(Path(folder) / "spot.trace")
        plan, _ = plan_remoe_from_trace(trace_path, trace, g, cost_model, Slo(slo_ttft_s, slo_tpot_s),
                                        inputs={"hardware": cpu.name, "gpu_hardware": gpu.name if gpu else "none",
                                                "pricing": list(defaults.PRICING), "made": "on the spot"})
    plan.extra.setdefault("notes", []).append(gpu_note)
    remote = sum(len(f.experts) for f in plan.functions)
    log.info("plan made on the spot from %d %s prompts: %s (main on %s), %d remote experts in %d functions, "
             "predicted TTFT %.4f s, TPOT %.4f s; %s", trace.num_requests, prompts, plan.predicted.get("shape"),
             plan.main.device, remote, len(plan.functions), plan.predicted["ttft_s"], plan.predicted["tpot_s"], gpu_note)
    return plan
