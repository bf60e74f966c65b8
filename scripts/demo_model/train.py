"""Step 4: train the demo Qwen3-MoE on the balanced four-domain stream and write the checkpoint.

    nohup python scripts/demo_model/train.py --steps N > runs/demo_model/train.log 2>&1 &

Seeded (data order, init). Loss = LM cross-entropy + router_aux_loss_coef * Switch-style load-balancing
loss (transformers' load_balancing_loss_func, Fedus et al. 2021 eq. 4-6), from output_router_logits=True.
Writes the bf16 checkpoint + tokenizer into src/moeserve/assets/demo/ and training_log.json beside it.
A resumable state is kept in runs/demo_model/train_state.pt every --save-every steps (--resume).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers as tf
from demo_geometry import ROUTER_AUX_LOSS_COEF, demo_config
from demo_paths import (
    ASSET_DIR,
    BOS_TOKEN,
    CORPUS_MANIFEST,
    DOMAINS,
    EOS_TOKEN,
    HELDOUT_DIR,
    PAD_TOKEN,
    RUN_DIR,
    TOKENIZER_WORK_DIR,
    TRAINING_LOG,
    read_jsonl,
)
from token_data import DomainStream, build_streams, encode_chunks, load_raw_tokenizer

from moeserve.atomic import atomic_dir, atomic_file, write_text_atomic

STATE_PATH = RUN_DIR / "train_state.pt"
STEP_TIME_JSON = RUN_DIR / "step_time.json"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json")


def sample_batch(streams: list[DomainStream], rng: np.random.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """`input_ids: [batch, seq_len]`: random windows, batch/len(streams) from every domain (stratified)."""
    per_domain = batch // len(streams)
    rows = []
    for stream in streams:
        starts = rng.integers(0, len(stream.tokens) - seq_len, size=per_domain)
        rows.extend(stream.tokens[s:s + seq_len] for s in starts)
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def lr_at(step: int, progress: float, peak_lr: float, warmup: int, final_frac: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to final_frac * peak_lr as progress goes 0 -> 1."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    return peak_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def progress_at(step: int, steps: int, warmup: int, elapsed_s: float, time_budget_s: float | None) -> float:
    """Fraction of the decay phase done: by steps, or by wall time when a budget is set and runs out first.

    The CPU is shared with other jobs, so a step costs anywhere from 1 s to 10 s; the time budget keeps
    the run near its planned length while still ending with a fully decayed learning rate.
    """
    by_steps = (step - warmup) / max(1, steps - warmup)
    if time_budget_s is None:
        return by_steps
    return max(by_steps, elapsed_s / time_budget_s)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on norm gains (1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model: tf.Qwen3MoeForCausalLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               clip: float) -> tuple[float, float]:
    """One optimiser step on `input_ids: [batch, seq]`; returns (lm_loss, aux_loss) before the update."""
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    aux = float(out.aux_loss.detach())
    return float(out.loss.detach()) - ROUTER_AUX_LOSS_COEF * aux, aux


def check_aux_loss_is_added(model: tf.Qwen3MoeForCausalLM, input_ids: torch.Tensor) -> dict:
    """Recompute the LM loss by hand and confirm transformers adds coef * aux_loss to it."""
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    total, aux = float(out.loss), float(out.aux_loss)
    expected = float(lm) + ROUTER_AUX_LOSS_COEF * aux
    if not (aux > 0 and abs(total - expected) < 1e-3):
        raise RuntimeError(f"aux loss not added as expected: loss={total} lm={float(lm)} aux={aux}")
    return {"loss": total, "lm_loss_by_hand": float(lm), "aux_loss": aux, "coef": ROUTER_AUX_LOSS_COEF,
            "added": True, "balanced_value": model.config.num_experts_per_tok}


def heldout_probe(tokenizer, bos_id: int, per_domain: int) -> dict[str, list[torch.Tensor]]:
    """A fixed few held-out chunks per domain (evenly spaced), `[1, 1 + n]` id tensors starting with <|bos|>."""
    probe = {}
    for domain in DOMAINS:
        texts = [r["text"] for r in read_jsonl(HELDOUT_DIR / f"{domain}.jsonl")]
        texts = texts[:: max(1, len(texts) // per_domain)][:per_domain]
        probe[domain] = [torch.tensor([[bos_id, *ids]]) for ids in encode_chunks(tokenizer, texts)]
    return probe


@torch.no_grad()
def heldout_losses(model: tf.Qwen3MoeForCausalLM, probe: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean next-token loss per domain on the probe chunks."""
    model.eval()
    result = {}
    for domain, seqs in probe.items():
        total, count = 0.0, 0
        for ids in seqs:
            logits = model(input_ids=ids, output_router_logits=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        result[domain] = total / count
    model.train()
    return result


def save_checkpoint(model: tf.Qwen3MoeForCausalLM, target: Path) -> dict:
    """bf16 safetensors + config + generation config + tokenizer files into `target` (other files kept)."""
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False  # inference does not need the aux loss; training used True
    model.generation_config = tf.GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, do_sample=False,
    )
    with atomic_dir(RUN_DIR / "checkpoint_out", "config.json", force=True) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER_WORK_DIR / name, tmp / name)
        config = json.loads((tmp / "config.json").read_text())
        if any("experts_implementation" in k for k in config):
            raise RuntimeError("experts implementation leaked into config.json")
        target.mkdir(parents=True, exist_ok=True)
        written = {}
        for path in sorted(tmp.iterdir()):
            shutil.copy(path, target / path.name)
            (target / path.name).chmod(0o644)
            written[path.name] = path.stat().st_size
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True, help="planned steps (upper bound with a time budget)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop (with the lr fully decayed) when this much training wall time is used")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--final-lr-frac", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts-implementation", default="eager")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    tokenizer = load_raw_tokenizer(TOKENIZER_WORK_DIR)
    bos_id, eos_id, pad_id = (tokenizer.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
    streams = build_streams(tokenizer, bos_id, eos_id, tokens_per_domain=None)
    probe = heldout_probe(tokenizer, bos_id, per_domain=8)
    print(f"tokenised in {time.time() - started:.1f}s: " + ", ".join(f"{s.domain}={len(s.tokens)}" for s in streams),
          flush=True)

    config = demo_config(tokenizer.get_vocab_size(), pad_id, bos_id, eos_id)
    model = tf.Qwen3MoeForCausalLM(config)
    model.config._experts_implementation = args.experts_implementation
    model.train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    rng = np.random.default_rng(args.seed)
    log: dict = {"loss_curve": [], "heldout_curve": []}
    first_step, elapsed_before = 0, 0.0
    if args.resume and STATE_PATH.exists():
        state = torch.load(STATE_PATH, weights_only=True)  # our own file, still never unpickle code
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        first_step, log, elapsed_before = state["step"], state["log"], state["elapsed_s"]
        print(f"resumed at step {first_step}", flush=True)
    else:
        log["aux_loss_check"] = check_aux_loss_is_added(model, sample_batch(streams, rng, 4, 128))
        print("aux loss check:", log["aux_loss_check"], flush=True)

    train_started = time.time() - elapsed_before
    window: list[tuple[float, float]] = []
    done, stopped_by, lr = first_step, "steps", 0.0
    for step in range(first_step, args.steps):
        elapsed = time.time() - train_started
        if args.time_budget_s is not None and elapsed >= args.time_budget_s:
            stopped_by = "time budget"
            break
        progress = progress_at(step, args.steps, args.warmup, elapsed, args.time_budget_s)
        lr = lr_at(step, progress, args.lr, args.warmup, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        window.append(train_step(model, optimizer, sample_batch(streams, rng, args.batch, args.seq_len), args.clip))
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:  # a time-budget stop logs the tail below
            lm, aux = (float(np.mean(v)) for v in zip(*window, strict=True))
            elapsed = time.time() - train_started
            log["loss_curve"].append({"step": done, "lr": lr, "lm_loss": round(lm, 4), "aux_loss": round(aux, 4),
                                      "elapsed_s": round(elapsed, 1)})
            print(f"step {done}/{args.steps} lr {lr:.2e} lm {lm:.4f} aux {aux:.4f} {elapsed:.0f}s", flush=True)
            window = []
        if done % args.eval_every == 0 and done != args.steps:
            losses = heldout_losses(model, probe)
            log["heldout_curve"].append({"step": done, **{d: round(v, 4) for d, v in losses.items()}})
            print("heldout", log["heldout_curve"][-1], flush=True)
        if done % args.save_every == 0 and done < args.steps:
            with atomic_file(STATE_PATH) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                            "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "log": log,
                            "elapsed_s": time.time() - train_started}, tmp)
    train_wall = time.time() - train_started
    if window:
        lm, aux = (float(np.mean(v)) for v in zip(*window, strict=True))
        log["loss_curve"].append({"step": done, "lr": lr, "lm_loss": round(lm, 4), "aux_loss": round(aux, 4),
                                  "elapsed_s": round(train_wall, 1)})
    losses = heldout_losses(model, probe)
    log["heldout_curve"].append({"step": done, **{d: round(v, 4) for d, v in losses.items()}})
    print(f"stopped by {stopped_by} at step {done}; heldout", log["heldout_curve"][-1], flush=True)

    written = save_checkpoint(model, ASSET_DIR)
    manifest = json.loads(CORPUS_MANIFEST.read_text())
    tokens_per_step = args.batch * args.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = expert_params // (config.num_hidden_layers * config.num_experts)
    training_log = {
        "model_class": "Qwen3MoeForCausalLM",
        "transformers_version": tf.__version__,
        "torch_version": torch.__version__,
        "geometry": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
            "tie_word_embeddings", "max_position_embeddings", "router_aux_loss_coef")},
        "parameters": {"total": n_params, "experts": expert_params,
                       "active_per_token": n_params - expert_params
                       + per_expert * config.num_hidden_layers * config.num_experts_per_tok},
        "checkpoint_files": written,
        "corpus": {
            s.domain: {"documents": s.documents, "chunks": s.chunks, "chars": s.chars, "tokens": len(s.tokens),
                       "source": manifest["domains"][s.domain]["source"],
                       "licence": manifest["domains"][s.domain]["licence"],
                       "heldout": manifest["domains"][s.domain]["heldout"]}
            for s in streams
        },
        "corpus_split_seed": manifest["seed"],
        "training": {
            "seed": args.seed, "steps": done, "steps_planned": args.steps, "time_budget_s": args.time_budget_s,
            "stopped_by": stopped_by, "batch_size": args.batch, "seq_len": args.seq_len,
            "tokens_per_step": tokens_per_step, "tokens_seen": tokens_per_step * done,
            "epochs": round(tokens_per_step * done / sum(len(s.tokens) for s in streams), 2),
            "batch_composition": f"{args.batch // len(streams)} random windows per domain per step",
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                          "grad_clip": args.clip},
            "lr_schedule": {"peak_lr": args.lr, "warmup_steps": args.warmup, "final_lr": args.lr * args.final_lr_frac,
                            "decay": "cosine over max(step progress, wall-time progress)"},
            "loss": "lm cross-entropy + router_aux_loss_coef * load-balancing aux loss",
            "experts_implementation": args.experts_implementation, "torch_threads": args.threads,
            "precision": "float32 training, saved as bfloat16", "machine": platform.processor() or platform.machine(),
            "wall_s": round(train_wall, 1), "mean_step_s": round(train_wall / max(1, done - first_step), 3),
            "resumed_from_step": first_step or None,
        },
        "step_time": json.loads(STEP_TIME_JSON.read_text()) if STEP_TIME_JSON.exists() else None,
        **log,
    }
    write_text_atomic(TRAINING_LOG, json.dumps(training_log, indent=1) + "\n")
    print(f"done in {train_wall:.0f}s; wrote {sorted(written)} to {ASSET_DIR}", flush=True)


if __name__ == "__main__":
    main()
