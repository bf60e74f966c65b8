"""`moeserve profile` as a function: capture a routing trace of real prompts and/or measure the hardware,
then write both outputs together (neither appears if either fails)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moeserve.atomic import OutputSet, check_output_file
from moeserve.errors import MoeServeError
from moeserve.hardware.from_config import measure_config_hardware
from moeserve.hardware.measure import measure_hardware
from moeserve.hardware.profile_io import write_profile
from moeserve.models.geometry import inspect_model
from moeserve.models.loading import checkpoint_fingerprint, load_model, load_tokenizer, resolve_device
from moeserve.traces.record import build_trace
from moeserve.traces.stats import trace_stats
from moeserve.workloads import load_prompts

Progress = Callable[[str, int, int | None, str], None]  # (task, done, total, status)


@dataclass(frozen=True)
class ProfileOptions:
    """prompts None: no trace; hardware False: no hardware profile (at least one of the two)."""

    model: str = "demo"
    prompts: str | None = None
    max_prompts: int | None = None
    gen_tokens: int = 32
    batch_size: int = 1
    max_prompt_tokens: int = 512
    device: str = "auto"
    out: Path = Path("moeserve.trace")
    router_probs: bool = False
    hardware: bool = False
    hardware_out: Path = Path("hardware-profile.yaml")
    seed: int = 0
    trust_remote_code: bool = False


def check_profile_options(o: ProfileOptions) -> None:
    """Everything that can be refused before the model loads."""
    if o.prompts is None and not o.hardware:
        raise MoeServeError("nothing to do: give --prompts to capture a trace and/or --hardware")
    if o.prompts is not None:
        check_output_file(o.out, "--out")
    if o.hardware:
        check_output_file(o.hardware_out, "--hardware-out")
        if o.prompts is not None and Path(o.out).resolve() == Path(o.hardware_out).resolve():
            raise MoeServeError("--out and --hardware-out name the same file")


def profile_model(o: ProfileOptions, progress: Progress = lambda *a: None) -> dict:
    """Run the profile; -> a summary (trace size and per-layer statistics, the files written)."""
    check_profile_options(o)
    # cheap: refuses dense models before any work; the checkpoint's geometry (bytes at its dtype) is what
    # the trace records, the same as `moeserve inspect`, whatever dtype the weights run in here
    geometry = inspect_model(o.model, trust_remote_code=o.trust_remote_code)
    device = resolve_device(o.device)
    if checkpoint_fingerprint(o.model) is None:  # a model card or a config-only directory: no weights
        return _profile_config_only(o, geometry, progress)
    prompt_list = load_prompts(o.prompts, max_prompts=o.max_prompts, seed=o.seed) if o.prompts else None
    model = load_model(o.model, device=device, trust_remote_code=o.trust_remote_code)
    summary: dict = {"model": o.model, "device": str(device)}
    trace = hw = None
    if prompt_list is not None:
        tokenizer = load_tokenizer(o.model, trust_remote_code=o.trust_remote_code)
        torch.manual_seed(o.seed)
        trace = build_trace(
            model, tokenizer, prompt_list, gen_tokens=o.gen_tokens, batch_size=o.batch_size,
            max_prompt_tokens=o.max_prompt_tokens, router_probs=o.router_probs, model_name=o.model, source=o.prompts,
            geometry=geometry.to_dict(), fingerprint=checkpoint_fingerprint(o.model),
            on_batch=lambda done, total: progress("profiling", done, total, f"{done}/{total} prompts"))
        summary.update({"trace": str(o.out), "source": o.prompts, "requests": trace.num_requests,
                        "tokens": trace.num_tokens, "prefill_tokens": int((trace["phase"] == 0).sum()),
                        "decode_tokens": int((trace["phase"] == 1).sum()), "per_layer": trace_stats(trace).to_dict()})
    if o.hardware:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        hw = measure_hardware(geometry.hidden_size, geometry.expert_intermediate_size, dtype=dtype, model=model,
                              progress=lambda step, i, n: progress("hardware", i, n, step))
        summary["hardware_profile"] = str(o.hardware_out)
        summary["hardware_conditions"] = dataclasses.asdict(hw.conditions)
    with OutputSet() as outputs:  # both files appear together, or neither does
        if trace is not None:
            trace.write_to(outputs.path(o.out))
        if hw is not None:
            write_profile(hw, outputs.path(o.hardware_out))
    return summary


def _profile_config_only(o: ProfileOptions, geometry, progress: Progress) -> dict:
    """`profile --hardware` of a model without weights: random weights of its config's shapes
    (hardware/from_config.py). Capturing a trace needs weights."""
    if o.prompts is not None:
        raise MoeServeError(f"{o.model} has no weights (a model card or config-only directory), so no prompts can "
                            f"run through it; make a trace with `moeserve trace synth --model {o.model} --like TRACE`")
    hw = measure_config_hardware(o.model, geometry, progress=lambda step, i, n: progress("hardware", i, n, step))
    with OutputSet() as outputs:
        write_profile(hw, outputs.path(o.hardware_out))
    return {"model": o.model, "device": "cpu", "hardware_profile": str(o.hardware_out), "from_config": True,
            "hardware_conditions": dataclasses.asdict(hw.conditions), "notes": hw.notes}
