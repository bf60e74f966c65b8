"""Step 5: evaluate the shipped checkpoint: held-out perplexity vs unigram, routing specialisation.

    python scripts/demo_model/evaluate.py

Loads src/moeserve/assets/demo offline (bf16 weights, computed in float32) and writes eval.json and
unigram_counts.json beside it. Per domain: perplexity of the model on every held-out chunk
(<|bos|> + text tokens, the text tokens scored) next to an add-one unigram model whose counts come
from that domain's training split (and one from all domains pooled). Routing: top-k selection
counts per layer captured with a forward pre-hook on every `mlp.experts` module, compared with
Jensen-Shannon divergence across domains and across two document halves of one domain.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers as tf
from demo_paths import (
    ASSET_DIR,
    BOS_TOKEN,
    DOMAINS,
    EOS_TOKEN,
    EVAL_JSON,
    HELDOUT_DIR,
    PAD_TOKEN,
    UNIGRAM_COUNTS,
    read_jsonl,
)
from routing_stats import specialisation_table, split_halves_by_document
from token_data import build_streams, load_raw_tokenizer, unigram_counts, unigram_log_probs

from moeserve.atomic import write_text_atomic

GENERATION_PROMPTS = {
    "code": "def read_config(path):\n",
    "docs": "The :mod:`json` module",
    "prose": "And the LORD said unto Moses,",
    "dictionary": "river\nn 1:",
}


class RoutingRecorder:
    """Counts top-k expert selections per layer. `counts: [layers, experts] int64` since the last reset."""

    def __init__(self, model: tf.Qwen3MoeForCausalLM):
        layers = model.model.layers
        self.counts = np.zeros((len(layers), model.config.num_experts), dtype=np.int64)
        self.handles = [layer.mlp.experts.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, layer: int):
        def record(module, args):
            top_k_index = args[1]  # (hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights)
            self.counts[layer] += np.bincount(top_k_index.reshape(-1).numpy(), minlength=self.counts.shape[1])
        return record

    def take(self) -> np.ndarray:
        counts, self.counts = self.counts, np.zeros_like(self.counts)
        return counts

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def chunk_nll(model: tf.Qwen3MoeForCausalLM, ids: list[int]) -> np.ndarray:
    """`ids: [1 + n]` (<|bos|> first) -> `nll: [n]` natural-log loss of each text token."""
    input_ids = torch.tensor([ids])
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    return F.cross_entropy(logits, input_ids[0, 1:], reduction="none").numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    tokenizer = tf.AutoTokenizer.from_pretrained(ASSET_DIR)
    model = tf.AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=torch.float32).eval()
    raw = load_raw_tokenizer(ASSET_DIR)
    special = tuple(raw.token_to_id(t) for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN))
    streams = build_streams(raw, special[1], special[2], tokens_per_domain=None)
    vocab = raw.get_vocab_size()
    counts = {s.domain: unigram_counts(s, vocab, special) for s in streams}
    pooled_log_probs = unigram_log_probs(sum(counts.values()))
    write_text_atomic(UNIGRAM_COUNTS, json.dumps({
        "about": "token counts of each domain's balanced training split (special tokens zeroed); "
                 "unigram baseline = add-one smoothing of these",
        "vocab_size": vocab, "counts": {d: c.tolist() for d, c in counts.items()}}, separators=(",", ":")) + "\n")

    recorder = RoutingRecorder(model)
    perplexity, domain_routing, half_routing = {}, {}, {}
    for domain in DOMAINS:
        rows = list(read_jsonl(HELDOUT_DIR / f"{domain}.jsonl"))
        log_probs = unigram_log_probs(counts[domain])
        model_nll, unigram_nll, pooled_nll, n_tokens, per_chunk_routing, chunk_tokens = 0.0, 0.0, 0.0, 0, [], []
        for row in rows:
            ids = tokenizer(row["text"])["input_ids"]
            if ids[0] != special[1] or ids[1:] != raw.encode(row["text"], add_special_tokens=False).ids:
                raise RuntimeError("AutoTokenizer and the raw tokenizer disagree")
            model_nll += float(chunk_nll(model, ids).sum())
            per_chunk_routing.append(recorder.take())
            targets = np.asarray(ids[1:])
            unigram_nll -= float(log_probs[targets].sum())
            pooled_nll -= float(pooled_log_probs[targets].sum())
            n_tokens += len(targets)
            chunk_tokens.append(len(ids))
        halves = split_halves_by_document([r["doc"] for r in rows], chunk_tokens)
        routing = np.stack(per_chunk_routing)  # [chunks, layers, experts]
        domain_routing[domain] = routing.sum(axis=0)
        half_routing[domain] = np.stack([routing[halves == h].sum(axis=0) for h in (0, 1)])
        model_ppl = math.exp(model_nll / n_tokens)
        unigram_ppl = math.exp(unigram_nll / n_tokens)
        perplexity[domain] = {
            "chunks": len(rows), "tokens": n_tokens, "model_ppl": round(model_ppl, 2),
            "unigram_ppl": round(unigram_ppl, 2), "pooled_unigram_ppl": round(math.exp(pooled_nll / n_tokens), 2),
            "model_over_unigram": round(model_ppl / unigram_ppl, 4),
            "meets_quarter_target": model_ppl <= unigram_ppl / 4,
        }
        print(domain, perplexity[domain], flush=True)
    recorder.remove()

    specialisation = specialisation_table(domain_routing, half_routing)
    all_counts = sum(domain_routing.values())
    load = all_counts / all_counts.sum(axis=1, keepdims=True) * all_counts.shape[1]  # 1.0 = perfectly even
    top_experts = {d: [np.argsort(-c[layer])[:3].tolist() for layer in range(c.shape[0])]
                   for d, c in domain_routing.items()}
    samples = {}
    for domain, prompt in GENERATION_PROMPTS.items():
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=48, do_sample=False)
        samples[domain] = {"prompt": prompt,
                           "continuation": tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)}
    report = {
        "checkpoint": "src/moeserve/assets/demo (bf16 weights, evaluated in float32)",
        "perplexity": perplexity,
        "routing_specialisation_jsd_bits": specialisation,
        "routing_histograms": {d: (c / c.sum(axis=1, keepdims=True)).round(5).tolist()
                               for d, c in domain_routing.items()},
        "expert_load_all_heldout": {"max_over_mean_per_layer": load.max(axis=1).round(3).tolist(),
                                    "min_over_mean_per_layer": load.min(axis=1).round(3).tolist(),
                                    "experts_never_selected_per_layer": (all_counts == 0).sum(axis=1).tolist(),
                                    "experts_under_1pct_of_mean_per_layer": (load < 0.01).sum(axis=1).tolist()},
        "top3_experts_per_layer": top_experts,
        "greedy_samples": samples,
        "default_experts_implementation_on_load": model.config._experts_implementation,
        "wall_s": round(time.time() - started, 1),
    }
    write_text_atomic(EVAL_JSON, json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("perplexity",)}, indent=1))
    print("JSD cross", specialisation["cross_domain_mean_per_layer"], "within",
          specialisation["within_domain_mean_per_layer"], "ratio", specialisation["ratio"])


if __name__ == "__main__":
    main()
