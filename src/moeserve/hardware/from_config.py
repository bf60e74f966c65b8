"""A hardware profile for a model known only by its config (a model card): random weights of the config's
shapes, no checkpoint.

Experts are measured at their real shape (`measure_hardware`, which always uses random weights). The
non-expert work cannot be run as one model (DeepSeek-V3's is 15 GB even without experts, and its
experts are 1.3 TB), so each kind of decoder layer the model has (dense or MoE, and its attention type:
full, sliding, linear) is built alone as a one-layer model with random weights and a small vocabulary,
its routed experts left unallocated on the meta device (the null experts of nonexpert.py never read
them), and timed. The LM head of the real vocabulary is timed on its own (on a slice of the vocabulary
when it is large, scaled by the vocabulary's size). The per-layer figure of the full model is then

    seconds_per_layer(x) = (sum over kinds of count_kind * t_kind(x) + t_head(x)) / num_layers,

an extrapolation from measured parts: the profile marks those curves `method: extrapolated` and says
how in its notes; a plan made from it says so too.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable

import numpy as np
import psutil
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moeserve.errors import MoeServeError
from moeserve.hardware.fit import fit_curve, round_sig, rounded
from moeserve.hardware.measure import DEFAULT_DECODE_BATCHES, DEFAULT_PREFILL_LENGTHS, measure_hardware
from moeserve.hardware.nonexpert import measure_non_expert
from moeserve.hardware.schema import HardwareProfile, NonExpertCurve, NonExpertSection
from moeserve.hardware.timing import time_calls, torch_threads
from moeserve.models.adapter import moe_layers, text_config
from moeserve.models.geometry import ModelGeometry
from moeserve.models.loading import load_config

SMALL_VOCAB = 256  # the one-layer models' vocabulary: their embedding and head cost next to nothing
HEAD_SLICE = 32768  # LM-head rows timed at most; a larger vocabulary is scaled linearly (memory-bound GEMV)

Progress = Callable[[str, int, int], None]


def layer_kinds(config, geometry: ModelGeometry) -> list[tuple[str, bool]]:
    """(attention type, is MoE) of each decoder layer: [num_layers]."""
    types = list(getattr(text_config(config), "layer_types", None) or [])
    if len(types) < geometry.num_layers:
        types = ["full_attention"] * geometry.num_layers
    moe = set(geometry.moe_layers)
    return [(types[i], i in moe) for i in range(geometry.num_layers)]


def small_config(config, layers: list[tuple[str, bool]]):
    """A copy of `config` with the given decoder layers ((attention type, is MoE) each; dense layers
    only first, as DeepSeek's `first_k_dense_replace` allows) and a SMALL_VOCAB vocabulary."""
    cfg = copy.deepcopy(config)
    text = text_config(cfg)
    text.num_hidden_layers = len(layers)
    text.vocab_size = SMALL_VOCAB
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(text, attr):
            setattr(text, attr, None)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [attention for attention, _ in layers]
    dense = [i for i, (_, is_moe) in enumerate(layers) if not is_moe]
    if hasattr(text, "first_k_dense_replace"):  # DeepSeek, GLM: the first k layers are dense
        text.first_k_dense_replace = len(dense)
    if hasattr(text, "mlp_only_layers"):  # Qwen MoE families
        text.mlp_only_layers = dense
    if hasattr(text, "max_window_layers"):
        text.max_window_layers = len(layers)
    return cfg


def meta_model(config, layers: list[tuple[str, bool]], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of small_config(config, layers) on the meta device, checked to have those dense and MoE
    layers."""
    cfg = small_config(config, layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if [layer.index for layer in moe_layers(model)] != [i for i, (_, is_moe) in enumerate(layers) if is_moe]:
        raise MoeServeError(f"cannot build {text_config(cfg).model_type} layers {layers} from its config "
                            "(its dense/MoE layer options are not the usual ones)")
    return model


def build_small_model(config, layers: list[tuple[str, bool]], dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> nn.Module:
    """A model of these layers (see small_config): random non-expert weights on `device`, routed experts
    left on the meta device (never allocated)."""
    model = meta_model(config, layers, dtype)
    cfg = model.config
    found = moe_layers(model)
    inside = {id(m) for layer in found for m in layer.experts.modules()}
    need = sum(p.numel() * p.element_size() for m in model.modules() if id(m) not in inside
               for p in m.parameters(recurse=False))
    if need > psutil.virtual_memory().available // 2:
        raise MoeServeError(f"{len(layers)} layer(s) of {text_config(cfg).model_type} need {need / 2**30:.1f} GiB "
                            "without their experts: too much for this machine's free memory")
    for module in model.modules():
        if id(module) not in inside:
            module.to_empty(device=device, recurse=False)
    with torch.no_grad():
        model.initialize_weights()  # normal(0, initializer_range) weights, unit norms, rotary tables
    return model.eval()


def _head_seconds(hidden: int, vocab: int, rows: list[int], dtype: torch.dtype, repeats: int) -> list[float]:
    """Seconds of the LM head [vocab, hidden] on `rows` tokens each, timed on at most HEAD_SLICE rows of
    the vocabulary and scaled by vocab / slice."""
    part = min(vocab, HEAD_SLICE)
    head = nn.Linear(hidden, part, bias=False, dtype=dtype)
    xs = [torch.randn(n, hidden, dtype=dtype) for n in rows]
    with torch.inference_mode():
        timings = time_calls([lambda x=x: head(x) for x in xs], "cpu", repeats, 2)
    return [t.best_s * vocab / part for t in timings]


def measure_config_hardware(spec: str, geometry: ModelGeometry, *, repeats: int = 20,
                            thread_counts=None, token_counts=None, prefill_lengths=DEFAULT_PREFILL_LENGTHS,
                            decode_batches=DEFAULT_DECODE_BATCHES, decode_context: int = 64,
                            progress: Progress | None = None) -> HardwareProfile:
    """The CPU hardware profile of the model whose config is at `spec` (card or directory), float32 (the
    dtype CPU serving runs half-precision checkpoints in): experts measured at their shape, non-expert
    layers extrapolated from one-layer models of each kind (module docstring)."""
    config = load_config(spec)
    kinds = Counter(layer_kinds(config, geometry))
    sizes = {"non_expert_bytes": geometry.non_expert_bytes, "expert_bytes": geometry.expert_bytes,
             "all_experts_bytes": geometry.all_expert_bytes}
    hw = measure_hardware(geometry.hidden_size, geometry.expert_intermediate_size, dtype="float32",
                          thread_counts=thread_counts, token_counts=token_counts, repeats=repeats,
                          progress=progress, devices=["cpu"], module_bytes=sizes)
    threads = max(c.threads for c in hw.expert.curves if c.device == "cpu")
    measured: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]] = {}

    def kind_seconds(kind: tuple[str, bool]) -> tuple[np.ndarray, np.ndarray]:
        """(prefill [P], decode [D]) seconds of one layer of this kind. A linear-attention layer cannot run
        alone (the cache needs an attention layer): it is timed after a full-attention layer, minus that."""
        if kind in measured:
            return measured[kind]
        base = ("full_attention", kind[1]) if "linear" in kind[0] else None
        layers = [base, kind] if base else [kind]
        if progress is not None:
            progress(f"non-expert {kind[0]} {'MoE' if kind[1] else 'dense'} layer", 0, 0)
        model = build_small_model(config, layers)
        with torch_threads(threads):
            t = measure_non_expert(model, prefill_lengths, decode_batches, decode_context, repeats=max(3, repeats // 2))
        del model
        total = (np.array(t.prefill_s) * t.num_layers, np.array(t.decode_s) * t.num_layers)
        if base:
            under = kind_seconds(base)
            total = tuple(np.maximum(a - b, 0.05 * a) for a, b in zip(total, under, strict=True))
        measured[kind] = total
        return total

    prefill = np.zeros(len(prefill_lengths))
    decode = np.zeros(len(decode_batches))
    parts = []
    for kind, count in sorted(kinds.items()):
        pre_s, dec_s = kind_seconds(kind)
        prefill += count * pre_s
        decode += count * dec_s
        parts.append(f"{count} x {'MoE' if kind[1] else 'dense'} {kind[0]}")
    with torch_threads(threads):
        prefill += _head_seconds(geometry.hidden_size, geometry.vocab_size, [1] * len(prefill_lengths),
                                 torch.float32, max(3, repeats // 2))
        decode += _head_seconds(geometry.hidden_size, geometry.vocab_size, list(decode_batches), torch.float32,
                                max(3, repeats // 2))
    prefill, decode = prefill / geometry.num_layers, decode / geometry.num_layers
    common = dict(device="cpu", threads=threads, dtype="float32", method="extrapolated")
    pre = tuple(round_sig(v) for v in prefill)
    dec = tuple(round_sig(v) for v in decode)
    section = NonExpertSection(
        model=f"{geometry.architecture} from config ({spec})", num_layers=geometry.num_layers,
        curves=(NonExpertCurve(phase="prefill", x=tuple(prefill_lengths), seconds_per_layer=pre,
                               fit=rounded(fit_curve(prefill_lengths, pre)), **common),
                NonExpertCurve(phase="decode", x=tuple(decode_batches), seconds_per_layer=dec,
                               fit=rounded(fit_curve(decode_batches, dec)), context_len=decode_context, **common)))
    head_note = (f"the LM head timed on {min(geometry.vocab_size, HEAD_SLICE)} of {geometry.vocab_size} vocabulary "
                 "rows and scaled" if geometry.vocab_size > HEAD_SLICE else "the LM head timed at full size")
    notes = (f"no checkpoint: random weights of {spec}'s config shapes in float32. Expert curves measured at the "
             f"real expert shape. Non-expert curves extrapolated: a one-layer model of each layer kind "
             f"({', '.join(parts)}; a linear-attention layer timed behind a full-attention one, which is subtracted) "
             f"timed with null experts and a {SMALL_VOCAB}-token vocabulary, weighted by their counts, plus "
             f"{head_note}, divided by {geometry.num_layers} layers")
    return dataclasses.replace(hw, non_expert=section, notes=notes,
                               source=f"moeserve profile {spec} --hardware (from config, random weights)")


def extrapolation_notes(*profiles: HardwareProfile) -> list[str]:
    """Plan notes for profiles whose figures were not all measured: extrapolated curves (a profile made
    from a config) and GPU figures estimated from a datasheet."""
    notes = []
    for p in profiles:
        curves = [*(p.expert.curves if p.expert else ()), *(p.non_expert.curves if p.non_expert else ())]
        odd = sorted({c.method for c in curves} - {"measured"})
        if "extrapolated" in odd:
            which = ", ".join(f"{getattr(c, 'phase', 'expert')} on {c.device}" for c in curves
                              if c.method == "extrapolated")
            notes.append(f"hardware profile {p.name}: {which} latencies are extrapolated, not measured "
                         f"({p.notes})")
        if p.datasheet is not None and not any(c.method == "measured" for c in curves if c.device == "cuda"):
            notes.append(f"GPU profile {p.name}: no GPU measurement; GPU latencies are the datasheet roofline "
                         f"estimate for {p.datasheet.gpu_name} (docs/profiles.md)")
    return notes
