"""Step 6: render the model card src/moeserve/assets/demo/README.md from training_log.json and eval.json.

    python scripts/demo_model/write_card.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from demo_paths import ASSET_DIR, DOMAINS, EVAL_JSON, TRAINING_LOG

from moeserve.atomic import write_text_atomic


def safetensors_header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def loss_summary(curve: list[dict], points: int = 8) -> list[list]:
    picks = sorted({round(i * (len(curve) - 1) / (points - 1)) for i in range(points)})
    return [[curve[i]["step"], f"{curve[i]['lr']:.2e}", curve[i]["lm_loss"], curve[i]["aux_loss"],
             curve[i]["elapsed_s"]] for i in picks]


def render(log: dict, ev: dict) -> str:
    g, t, p = log["geometry"], log["training"], log["parameters"]
    files = {str(f.relative_to(ASSET_DIR)): f.stat().st_size for f in sorted(ASSET_DIR.rglob("*"))
             if f.is_file() and f.name != "README.md"}
    total_bytes = sum(files.values())
    header = safetensors_header(ASSET_DIR / "model.safetensors")
    tensor_names = sorted(k for k in header if k != "__metadata__")
    layer0 = [f"`{k}` {header[k]['dtype']} {header[k]['shape']}" for k in tensor_names
              if ".layers.0." in k and (".experts." not in k or ".experts.0." in k or "_proj.weight" not in k)]
    per_expert = any(".mlp.experts.0.gate_proj.weight" in k for k in tensor_names)
    layout = (
        "Although the v5 module holds each layer's experts as fused 3-D parameters "
        "(`mlp.experts.gate_up_proj` `[experts, 2 * moe_intermediate, hidden]`, `mlp.experts.down_proj` "
        "`[experts, hidden, moe_intermediate]`), the saved file uses the original **per-expert** Qwen3-MoE "
        "layout: `mlp.experts.<e>.gate_proj.weight` / `up_proj.weight` `[moe_intermediate, hidden]` and "
        "`down_proj.weight` `[hidden, moe_intermediate]` for every expert e, plus the router `mlp.gate.weight` "
        "`[experts, hidden]`. transformers converts between the two on save and load."
        if per_expert else
        "Experts are saved **fused**, as in the v5 module: `mlp.experts.gate_up_proj` and `mlp.experts.down_proj` "
        "per layer, plus the router `mlp.gate.weight`."
    )
    corpus_rows = [[d, c["documents"], c["chunks"], f"{c['chars']:,}", f"{c['tokens']:,}", c["heldout"]["documents"],
                    c["heldout"]["chunks"], f"{c['heldout']['chars']:,}", c["licence"]]
                   for d, c in log["corpus"].items()]
    ppl = ev["perplexity"]
    ppl_rows = [[d, ppl[d]["chunks"], ppl[d]["tokens"], ppl[d]["model_ppl"], ppl[d]["unigram_ppl"],
                 ppl[d]["pooled_unigram_ppl"], ppl[d]["model_over_unigram"],
                 "yes" if ppl[d]["meets_quarter_target"] else "**no**"] for d in DOMAINS]
    js = ev["routing_specialisation_jsd_bits"]
    n_layers = len(js["cross_domain_mean_per_layer"])
    jsd_rows = [[f"layer {i}", js["cross_domain_mean_per_layer"][i], js["within_domain_mean_per_layer"][i]]
                for i in range(n_layers)]
    jsd_rows.append(["**mean**", js["cross_domain_mean"], js["within_domain_mean"]])
    pair_rows = [[pair.replace("|", " vs "), round(sum(v) / len(v), 4)] for pair, v in js["cross_domain_per_pair"].items()]
    pair_rows += [[f"{d}: half A vs half B", round(sum(v) / len(v), 4)] for d, v in js["within_domain_per_domain"].items()]
    st = log.get("step_time") or {"implementations": {}, "seq_len": t["seq_len"]}
    st_rows = [[impl, r["batch"], r["median_step_s"], r["min_step_s"], r["tokens_per_s_at_median"]]
               for impl, r in st["implementations"].items()]
    load = ev["expert_load_all_heldout"]
    samples = "\n\n".join(f"*{d}* — prompt `{s['prompt']!r}`:\n\n```\n{s['prompt']}{s['continuation']}\n```"
                          for d, s in ev["greedy_samples"].items())
    aux = log.get("aux_loss_check", {})
    first, last = log["loss_curve"][0], log["loss_curve"][-1]
    held_first, held_last = log["heldout_curve"][0], log["heldout_curve"][-1]

    return f"""# moeserve demo MoE (`demo`)

A small but genuinely trained Mixture-of-Experts language model that ships inside moeserve and is the
default model of every command (`moeserve inspect demo`, `moeserve profile demo ...`). It is a standard
transformers v5 `Qwen3MoeForCausalLM` checkpoint: load it with
`AutoModelForCausalLM.from_pretrained(<this dir>)` and `AutoTokenizer.from_pretrained(<this dir>)`, offline.

It was trained from scratch on a CPU in {t['wall_s'] / 60:.0f} minutes on four deliberately different text domains
(Python code, Python documentation, King James Bible prose, WordNet definitions), so that its router has
something to specialise on. It is a workload generator and test subject for MoE serving, not a useful
language model.

## Geometry

{table(["field", "value"], [[k, v] for k, v in g.items()])}

Every layer is a sparse MoE block (`decoder_sparse_step=1`, no dense MLP layers, no shared expert).
Parameters: {p['total']:,} total, {p['experts']:,} in routed experts, about {p['active_per_token']:,} active
per token (attention, router, embeddings and top-{g['num_experts_per_tok']} experts of every layer).

### What transformers {log['transformers_version']} saved

`model.save_pretrained` after `.to(torch.bfloat16)` writes one `model.safetensors`, all tensors BF16
({len(tensor_names)} of them; the tied `lm_head.weight` is not stored). {layout}

Layer 0 (expert tensors shown for expert 0 only):

{chr(10).join("- " + x for x in layer0)}

`config.json` does not set `_experts_implementation`; on load transformers picked
`{ev['default_experts_implementation_on_load']}`. `output_router_logits` is saved as false (inference does not
need the auxiliary loss); training ran with it on.

### Files ({total_bytes / 2**20:.2f} MiB without this card)

{table(["file", "bytes"], [[k, f"{v:,}"] for k, v in files.items()])}

## Corpus

Real text from installed packages only, no model or data hub. Four domains, split by document into
train / held-out with a fixed seed ({log['corpus_split_seed']}); each domain's training split is capped at
the same number of tokens so no domain dominates (chunks are `<|bos|> text <|eos|>`).

{table(["domain", "train docs", "train chunks", "train chars", "train tokens", "held-out docs",
        "held-out chunks", "held-out chars", "licence"], corpus_rows)}

Sources:

{chr(10).join(f"- **{d}**: {c['source']}." for d, c in log['corpus'].items())}

A document is a .py file, a documentation page, a Bible chapter, or a run of 25 consecutive WordNet
entries. Chunks are natural units of roughly 100-1500 characters: a top-level function or class (long
classes cut into methods), a documentation section, a few verses (one a line, no verse numbers), a few
dictionary entries (headword line, then one line per sense). The held-out chunks ship in `heldout/<domain>.jsonl`
(`{{"text", "domain", "doc"}}` per line) for evaluation and as labelled prompts.

Licences: the code and documentation text is © Python Software Foundation under the PSF License
Agreement (see `LICENSE-PSF`); the KJV text is in the public domain; the WordNet definitions are
"WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved." and used under the WordNet 3.0
licence, whose notice and disclaimer are in `LICENSE-WORDNET`. The Shakespeare text inside the
`genai-perf==0.0.16` wheel was considered for `prose` and left out: its punctuation is stripped.

## Tokenizer

Byte-level BPE trained with the `tokenizers` library on the training split of all four domains,
vocabulary {g['vocab_size']} including `<|pad|>` (0), `<|bos|>` (1), `<|eos|>` (2). Saved as `tokenizer.json` +
`tokenizer_config.json` (`PreTrainedTokenizerFast`). Encoding prepends `<|bos|>` (as in training);
`<|eos|>` is the generation config's end-of-sequence token. Characters per token on the training split:
{", ".join(f"{d} {c['chars'] / c['tokens']:.2f}" for d, c in log['corpus'].items())}.

## Training

- {t['steps']} steps x {t['batch_size']} sequences x {t['seq_len']} tokens = {t['tokens_seen']:,} tokens
  ({t['epochs']} passes over the balanced training stream); {t['batch_composition']}.
  Planned {t['steps_planned']} steps with a {t['time_budget_s']:.0f} s time budget; stopped by: {t['stopped_by']}.
- Loss: next-token cross-entropy + {g['router_aux_loss_coef']} x the load-balancing auxiliary loss
  (transformers' `load_balancing_loss_func`, Switch Transformer eq. 4-6, computed from
  `output_router_logits=True`). Checked at step 0: `loss` = hand-computed LM loss
  ({aux.get('lm_loss_by_hand', float('nan')):.4f}) + 0.01 x aux ({aux.get('aux_loss', float('nan')):.4f}); the aux loss equals
  top-k = {g['num_experts_per_tok']} under perfectly even routing.
- AdamW (betas 0.9/0.95, weight decay {t['optimizer']['weight_decay']} on matrices), gradient clip
  {t['optimizer']['grad_clip']}, peak lr {t['lr_schedule']['peak_lr']} after {t['lr_schedule']['warmup_steps']} warm-up steps, cosine decay to
  {t['lr_schedule']['final_lr']:.1e} following max(step progress, wall-time progress), so the rate was fully
  decayed when the time budget ran out. Float32 training, saved as bfloat16. Seed {t['seed']}.
- Experts implementation during training: `{t['experts_implementation']}`, torch threads {t['torch_threads']},
  {t['wall_s']:.0f} s wall ({t['mean_step_s']} s/step) on a 2-core CPU shared with other jobs.

Step time per experts implementation (seq len {st['seq_len']}, measured round-robin on the shared CPU):

{table(["implementation", "batch", "median s/step", "min s/step", "tokens/s at median"], st_rows)}

The minimum is the closest to an idle machine: `eager` runs a step in about 1.1 s there, `grouped_mm`
(transformers' CPU fallback) about 3.5x slower, `batched_mm` (one gathered weight matrix per token and
expert, ~12 GB at batch 8) hopeless. Under heavy contention from other jobs, a first training run with `eager` and
2 OpenMP threads took 14 s/step (its first 10 steps; aborted), the restarted 1-thread run about 3 s/step,
so training used `eager` with 1 thread.

Loss curve (mean over the preceding {log['loss_curve'][1]['step'] - log['loss_curve'][0]['step']} steps):

{table(["step", "lr", "LM loss", "aux loss", "elapsed s"], loss_summary(log['loss_curve']))}

LM loss {first['lm_loss']} -> {last['lm_loss']}; aux loss {first['aux_loss']} -> {last['aux_loss']}.
Held-out probe loss (8 chunks per domain) at step {held_first['step']}: {", ".join(f"{d} {held_first[d]}" for d in DOMAINS)};
at step {held_last['step']}: {", ".join(f"{d} {held_last[d]}" for d in DOMAINS)}.

## Evaluation (`scripts/demo_model/evaluate.py`, on the shipped bf16 weights)

### Held-out perplexity

Every held-out chunk, `<|bos|>` + text, text tokens scored. Unigram = add-one smoothed unigram model
from that domain's training-split token counts (`unigram_counts.json`); pooled = from all four domains.
Target: model <= 1/4 of the domain unigram perplexity.

{table(["domain", "chunks", "tokens", "model ppl", "unigram ppl", "pooled unigram ppl", "model / unigram",
        "<= 1/4"], ppl_rows)}

### Routing specialisation

Per layer, the histogram of top-{g['num_experts_per_tok']} expert selections over each domain's held-out tokens
(captured with a forward pre-hook on `model.model.layers[i].mlp.experts`), compared with the Jensen-Shannon
divergence (base 2, 0 = same, 1 = disjoint). Cross-domain = mean over the 6 domain pairs; within-domain =
two halves of one domain's held-out documents, mean over the 4 domains.

{table(["layer", "cross-domain JSD", "within-domain JSD"], jsd_rows)}

Cross / within = {js['ratio']}x. Per pair (mean over layers):

{table(["pair", "JSD"], pair_rows)}

Expert load over all held-out tokens (count / mean count): max per layer {load['max_over_mean_per_layer']},
min per layer {load['min_over_mean_per_layer']}; experts never selected per layer
{load['experts_never_selected_per_layer']} of {g['num_experts']}. The load-balancing loss kept the *batch-level*
aux loss near its balanced value of {g['num_experts_per_tok']}, but some experts are (nearly) dead on this
text: a realistic skew for the caching and placement experiments moeserve runs.

### Greedy samples

{samples}

## Limitations

- Tiny (about {p['total'] / 1e6:.1f}M parameters) and trained for {t['wall_s'] / 60:.0f} CPU minutes on
  {t['tokens_seen'] / 1e6:.1f}M tokens: it continues text in the style of each domain but its content is
  often wrong or repetitive. Do not use it for anything but exercising MoE machinery.
- English and Python only; the vocabulary is fitted to these four sources.
- The perplexities are on held-out documents of the same sources, not on general text.
- The held-out split is small (about 80 KB per domain), so the routing divergences carry sampling noise;
  the within-domain numbers show its size.
- Positions beyond {t['seq_len']} tokens were never trained, although `max_position_embeddings` is {g['max_position_embeddings']}.

## Rebuild

See `scripts/demo_model/README.md`: `build_corpus.py` -> `train_tokenizer.py` -> `measure_step_time.py` ->
`train.py --steps {t['steps_planned']} --time-budget-s {t['time_budget_s']:.0f} --threads {t['torch_threads']}` ->
`evaluate.py` -> `write_card.py`. On an idle machine drop the time budget to get a purely step-driven schedule. Everything is seeded; CPU float
arithmetic with threads is not bit-reproducible, so a rebuild gives close, not identical, numbers.
"""


def main() -> None:
    log = json.loads(TRAINING_LOG.read_text())
    ev = json.loads(EVAL_JSON.read_text())
    write_text_atomic(ASSET_DIR / "README.md", render(log, ev))
    print(f"wrote {ASSET_DIR / 'README.md'}")


if __name__ == "__main__":
    main()
