"""A plan made on the spot when `moeserve serve` is given none: profile a few real prompts, then Remoe.

Planning needs a hardware profile measured for the model's expert shape; a shipped profile that matches
(cpu-2core matches the demo) is used, otherwise the caller serves all experts locally and says how to
plan properly (`moeserve profile --hardware`, `moeserve plan`).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("moeserve.serving")


def matching_hardware_profile(hidden_size: int, intermediate_size: int):
    """The first shipped hardware profile measured for this expert shape with non-expert figures, or None."""
    from moeserve.hardware import available_hardware_profiles, load_hardware_profile

    for name in available_hardware_profiles():
        profile = load_hardware_profile(name)
        e = profile.expert
        if e is not None and (e.hidden_size, e.intermediate_size) == (hidden_size, intermediate_size) \
                and profile.non_expert is not None and profile.datasheet is None:
            return profile
    return None


def plan_on_the_spot(model_spec: str, out_dir: Path, *, prompts: str = "builtin:mixed", max_prompts: int = 32,
                     gen_tokens: int = 8, slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.25) -> Path | None:
    """Profile `max_prompts` prompts, plan with Remoe, write `out_dir/plan.yaml`; None when no hardware
    profile matches the model (then nothing is written)."""
    from moeserve.hardware import load_hardware_profile
    from moeserve.models.geometry import inspect_model
    from moeserve.models.loading import load_model, load_tokenizer
    from moeserve.planning.cost import CostModel
    from moeserve.planning.deployment import plan_remoe_from_trace
    from moeserve.planning.from_profiles import plan_hardware, plan_model
    from moeserve.planning.inputs import Slo
    from moeserve.planning.pricing import load_pricing
    from moeserve.traces.profile import build_trace
    from moeserve.workloads import load_prompts

    g = inspect_model(model_spec)
    cpu = matching_hardware_profile(g.hidden_size, g.expert_intermediate_size)
    if cpu is None:
        return None
    model, tokenizer = load_model(model_spec), load_tokenizer(model_spec)
    geometry = g  # the checkpoint's geometry (bytes at its dtype), as `moeserve profile` records
    trace = build_trace(model, tokenizer, load_prompts(prompts, max_prompts=max_prompts), gen_tokens=gen_tokens,
                        batch_size=8, model_name=str(model_spec), source=prompts, geometry=geometry.to_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    trace_path = trace.save(out_dir / "spot.trace")
    prices = load_pricing("aws-lambda-x86", "modal-a100-80gb")
    gpu = load_hardware_profile("a100-80gb")
    cost_model = CostModel.build(plan_model(geometry), plan_hardware(geometry, cpu, gpu, prices), prices)
    plan, _ = plan_remoe_from_trace(trace_path, trace, geometry, cost_model, Slo(slo_ttft_s, slo_tpot_s),
                                    inputs={"hardware": cpu.name, "gpu_hardware": gpu.name,
                                            "pricing": ["aws-lambda-x86", "modal-a100-80gb"], "made": "on the spot"})
    path = plan.save(out_dir / "plan.yaml")
    remote = sum(len(f.experts) for f in plan.functions)
    log.info("plan made on the spot from %d %s prompts: %d remote experts in %d functions, predicted TTFT %.4f s, "
             "TPOT %.4f s (%s)", trace.num_requests, prompts, remote, len(plan.functions), plan.predicted["ttft_s"],
             plan.predicted["tpot_s"], path)
    return path
