"""`moeserve finetune-router` end to end: data, before/after evaluation, training, atomic output."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeserve.atomic import atomic_dir, check_output_dir
from moeserve.errors import MoeServeError
from moeserve.finetune.data import batches, split_documents, token_windows
from moeserve.finetune.report import compare_runs, run_held_out
from moeserve.finetune.router_training import RouterFinetuneConfig, router_parameters, train_router
from moeserve.models.adapter import require_moe_layers
from moeserve.models.geometry import geometry_of
from moeserve.models.loading import load_config, load_model, load_tokenizer, resolve_device
from moeserve.workloads import load_prompts


def tensor_hashes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """sha256 of every parameter and buffer, cast to the checkpoint dtype (exact for bf16 -> fp32 -> bf16)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        out[name] = hashlib.sha256(t.flatten().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


REPORT_NAME = "finetune-report.json"  # also the marker of a directory moeserve wrote (--force may replace it)


def check_finetune_output(out: Path, force: bool) -> Path:
    """Refuse an unusable output directory before any work (see atomic.check_output_dir)."""
    return check_output_dir(out, REPORT_NAME, force, what="output directory")


def finetune_router(
    model_spec: str, prompts_source: str, out: Path, cfg: RouterFinetuneConfig, *, eval_fraction: float = 0.2,
    max_prompts: int | None = None, device: str = "cpu", force: bool = False, trust_remote_code: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Fine-tune `model_spec`'s routers on text from `prompts_source`; write a full model directory,
    the router weights alone (router.safetensors) and finetune-report.json to `out` atomically."""


    out = Path(out)
    check_finetune_output(out, force)
    if cfg.steps <= 0:
        raise MoeServeError("--steps must be positive")
    config = load_config(model_spec, trust_remote_code=trust_remote_code)
    saved_dtype = getattr(config, "dtype", None) or torch.float32
    saved_dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype
    dev = resolve_device(device)
    tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    model = load_model(model_spec, dtype=torch.float32, device=dev, trust_remote_code=trust_remote_code)
    layers = require_moe_layers(model, str(model_spec))
    router_ids = {id(p) for _, p in router_parameters(layers)}  # raises if routers have no weights
    router_names = {n for n, p in model.named_parameters() if id(p) in router_ids}
    prompts = load_prompts(prompts_source, max_prompts=max_prompts, seed=cfg.seed)
    train_docs, held_docs = split_documents(prompts, eval_fraction, cfg.seed)
    train_windows = token_windows(tokenizer, [p.text for p in train_docs], cfg.seq_len)
    held = {}
    for domain in sorted({p.domain or "all" for p in held_docs}):
        texts = [p.text for p in held_docs if (p.domain or "all") == domain]
        held[domain] = token_windows(tokenizer, texts, cfg.seq_len)
    geometry = geometry_of(model, dtype=saved_dtype)
    hashes_before = tensor_hashes(model, saved_dtype)
    before = run_held_out(model, held)
    t0 = time.perf_counter()
    history = train_router(model, batches(train_windows, cfg.batch_size, cfg.seed), cfg, on_step=on_step)
    train_s = time.perf_counter() - t0
    with atomic_dir(out, REPORT_NAME, force) as tmp:
        model.to(saved_dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        module_names = {f"layers.{layer.index}.router": layer.router for layer in layers}
        routers = {f"{prefix}.{n}": p.detach().to("cpu", saved_dtype).contiguous()
                   for prefix, mod in module_names.items() for n, p in mod.named_parameters()}
        save_file(routers, str(tmp / "router.safetensors"), metadata={"base_model": str(model_spec)})
        reloaded = load_model(tmp, dtype=torch.float32, device=dev, trust_remote_code=trust_remote_code)
        hashes_after = tensor_hashes(reloaded, saved_dtype)
        changed = {n for n in hashes_before if hashes_before[n] != hashes_after.get(n)}
        frozen_changed = sorted(changed - router_names)
        if frozen_changed or set(hashes_before) != set(hashes_after):
            raise MoeServeError(f"frozen tensors changed in the saved model: {frozen_changed[:5]}")
        after = run_held_out(reloaded, held)
        report = compare_runs(before, after, layers[0].num_experts, layers[0].top_k, geometry.expert_bytes)
        report.update({
            "model": str(model_spec), "prompts": prompts_source, "config": cfg.to_dict(),
            "train_documents": len(train_docs), "held_out_documents": len(held_docs),
            "train_tokens": int(train_windows.numel()), "held_out_tokens": {d: int(w.numel()) for d, w in held.items()},
            "train_seconds": train_s, "history": history,
            "frozen_tensors_verified": len(hashes_before) - len(changed), "router_tensors_changed": sorted(changed),
            "saved_dtype": str(saved_dtype).removeprefix("torch."),
        })
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report

