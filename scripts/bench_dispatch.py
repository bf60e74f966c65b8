"""Decode time per token at batch 1: transformers.generate vs moeserve dispatch (all-local, half-remote).

    python scripts/bench_dispatch.py [--model demo|PATH] [--new-tokens 32] [--repeats 3] [--threads 2] [--json out.json]

Every run carries its own baseline: plain `generate` on the same model, prompt and threads. Decode time
per token is (time for N new tokens - time for 1 new token) / (N - 1), so prefill is excluded; the
median over interleaved repeats is reported. "half-remote" puts experts [E/2, E) of every MoE layer in one expert
function per layer (separate processes, 1 thread each); the per-layer transport overhead comes from
the dispatch's own counters (see `moeserve.experts.dispatch.LayerStats`).
Without the demo model (src/moeserve/assets/demo) a random Qwen3-MoE of the demo's shape is used.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moeserve.engine.model_runner import ModelRunner
from moeserve.engine.sampling import SamplingParams
from moeserve.engine.sequence import Sequence
from moeserve.experts.dispatch import install_dispatch
from moeserve.experts.process_backend import ProcessBackend
from moeserve.hardware.transport import measure_transport
from moeserve.models.adapter import require_moe_layers
from moeserve.models.loading import DEMO_MODEL_DIR, load_model
from moeserve.plan.placement import ExpertFunction, ExpertPlacement


def stand_in_model(path: Path) -> Path:
    """A random Qwen3-MoE shaped like the demo model (4 layers x 32 experts, top-4)."""
    import transformers as tf

    config = tf.Qwen3MoeConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def released_memory(model_dir: Path, placement: ExpertPlacement) -> dict:
    """Main-process RSS before/after freeing the remote experts' weights (release_remote_weights)."""
    import gc
    from types import SimpleNamespace

    import psutil

    specs = {f.id: f for f in placement.functions}
    no_pool = SimpleNamespace(model_dir=str(model_dir), functions=dict.fromkeys(specs), specs=lambda: specs)

    model = load_model(model_dir)
    layers = require_moe_layers(model)
    per_expert = sum(t.numel() * t.element_size() for t in (layers[0].experts.gate_up_proj[0],
                                                            layers[0].experts.down_proj[0]))
    remote_bytes = per_expert * sum(len(placement.remote_experts(la.index)) for la in layers)
    gc.collect()
    before = psutil.Process().memory_info().rss
    install_dispatch(model, placement, no_pool, release_remote_weights=True)  # no calls made
    gc.collect()
    after = psutil.Process().memory_info().rss
    return {"remote_expert_mb": remote_bytes / 2**20, "main_rss_drop_mb": (before - after) / 2**20}


def decode_s_per_token(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(seconds per decoded token, excluding prefill; the generated ids [1, P + new_tokens])."""
    def run(n: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0, out

    t_one, _ = run(1)
    t_all, out = run(new_tokens)
    return (t_all - t_one) / (new_tokens - 1), out


def engine_s_per_token(model, handle, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """The engine's own path (ModelRunner: prefill, then decode steps at batch 1), greedy, measured like
    `decode_s_per_token`: (seconds per decode step, the ids [1, P + new_tokens])."""
    def run(n: int) -> tuple[float, list[int]]:
        runner = ModelRunner(model, handle.recorder)
        seq = Sequence(prompt[0].tolist(), SamplingParams(max_tokens=n, temperature=0.0))
        t0 = time.perf_counter()
        if "seqs" in inspect.signature(runner.prefill).parameters:  # batched prefill
            (token,), _, _ = runner.prefill([seq])
            seq.generated.append(token)
            runner.join([seq])
        else:  # an engine that prefills one sequence at a time (to compare with older trees)
            token, _, _ = runner.prefill(seq)
            seq.generated.append(token)
            runner.join(seq)
        for _ in range(n - 1):
            (token,), _, _ = runner.decode()
            seq.generated.append(token)
        return time.perf_counter() - t0, seq.generated

    t_one, _ = run(1)
    t_all, tokens = run(new_tokens)
    return (t_all - t_one) / (new_tokens - 1), torch.cat([prompt, torch.tensor([tokens])], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tmp = None
    model_dir = Path(DEMO_MODEL_DIR if args.model == "demo" else args.model)
    if args.model == "demo" and not (model_dir / "config.json").is_file():
        tmp = tempfile.TemporaryDirectory()
        model_dir = stand_in_model(Path(tmp.name) / "stand_in")
        print(f"demo model absent: using a random stand-in of its shape at {model_dir}")
    model = load_model(model_dir)
    layers = require_moe_layers(model)
    num_experts = layers[0].num_experts
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    report: dict = {"model": str(model_dir), "threads": args.threads, "new_tokens": args.new_tokens,
              "moe_layers": len(layers), "experts": num_experts, "top_k": layers[0].top_k}

    all_local = ExpertPlacement.all_local([la.index for la in layers], num_experts)
    half = num_experts // 2
    half_remote = ExpertPlacement(
        {la.index: tuple(range(half)) for la in layers},
        tuple(ExpertFunction(f"layer{la.index}", la.index, tuple(range(half, num_experts))) for la in layers))
    samples: dict[str, list[float]] = {"hf": [], "all_local": [], "engine": [], "half_remote": [],
                                       "engine_half_remote": []}
    outputs: dict[str, torch.Tensor] = {}
    totals: dict[int, dict] = {}
    with torch.inference_mode(), ProcessBackend.from_model(model, str(model_dir), half_remote) as pool:
        # interleaved repeats (hf, all-local, half-remote, hf, ...) so that drifting load hits all three alike
        for repeat in range(args.repeats + 1):  # repeat 0 warms up
            for name, placement in (("hf", None), ("all_local", all_local), ("engine", all_local),
                                    ("half_remote", half_remote), ("engine_half_remote", half_remote)):
                handle = None if placement is None else install_dispatch(model, placement, pool)
                if name.startswith("engine"):
                    s_per_token, outputs[name] = engine_s_per_token(model, handle, prompt, args.new_tokens)
                else:
                    s_per_token, outputs[name] = decode_s_per_token(model, prompt, args.new_tokens)
                if repeat:
                    samples[name].append(s_per_token)
                    for layer, st in (handle.stats() if handle else {}).items():
                        acc = totals.setdefault(layer, dict.fromkeys(st, 0))
                        for k, v in st.items():
                            acc[k] += v
                if handle is not None:
                    handle.remove()
        metrics = pool.metrics()
        uss = {fid: fn.proc.ready_info["uss_bytes"] for fid, fn in pool.functions.items()}
    for name, values in samples.items():
        report[f"{name}_ms_per_token"] = 1e3 * statistics.median(values)
        report[f"{name}_ms_per_token_samples"] = [1e3 * v for v in values]
    for name in samples:
        if name != "hf":
            report[f"{name}_same_tokens"] = bool(torch.equal(outputs[name], outputs["hf"]))
            report[f"{name}_vs_hf"] = report[f"{name}_ms_per_token"] / report["hf_ms_per_token"]
    report["engine_half_remote_vs_engine"] = report["engine_half_remote_ms_per_token"] / report["engine_ms_per_token"]
    report["per_layer"] = {
        str(i): {"calls": s["calls"], **{k: 1e6 * s[k] / max(1, s["calls"]) for k in
                 ("plan_s", "send_s", "local_s", "wait_s", "gather_s", "remote_compute_s", "wall_s", "overhead_s")}}
        for i, s in totals.items()}
    report["remote_call_us"] = {"latency": 1e6 * metrics["latency_s"] / max(1, metrics["calls"]),
                                "compute": 1e6 * metrics["compute_s"] / max(1, metrics["calls"])}
    report["cold_start_s"] = {fid: f["last_cold_start_s"] for fid, f in metrics["functions"].items()}
    report["function_rss_mb"] = {fid: f["rss_bytes"] / 2**20 for fid, f in metrics["functions"].items()}
    report["function_uss_mb"] = {fid: b / 2**20 for fid, b in uss.items()}
    report.update(released_memory(model_dir, half_remote))
    row_bytes = layers[0].hidden_size * layers[0].experts.down_proj.element_size()
    floor = measure_transport([row_bytes, 8 * row_bytes], repeats=200)
    report["shm_round_trip_us"] = {str(n): 1e6 * t for n, t in zip(floor.nbytes, floor.seconds, strict=True)}

    print(f"decode ms/token at batch 1 ({args.threads} threads), median of {args.repeats} interleaved repeats:")
    print(f"  generate {report['hf_ms_per_token']:.2f}")
    for name in list(samples)[1:]:
        print(f"  {name:<19} {report[f'{name}_ms_per_token']:6.2f}  ({report[f'{name}_vs_hf']:.2f}x generate; "
              f"same tokens: {report[f'{name}_same_tokens']})")
    print(f"  engine half-remote / engine all-local: {report['engine_half_remote_vs_engine']:.2f}x")
    print(f"remote call (send -> result) {report['remote_call_us']['latency']:.0f} us, of which the function computed "
          f"{report['remote_call_us']['compute']:.0f} us")
    print("per layer call, microseconds (mean over decode+prefill calls):")
    print("layer  plan  send  local  wait  gather  remote_compute  wall  overhead")
    for i, s in report["per_layer"].items():
        print(f"{i:>5} {s['plan_s']:5.0f} {s['send_s']:5.0f} {s['local_s']:6.0f} {s['wait_s']:5.0f} "
              f"{s['gather_s']:7.0f} {s['remote_compute_s']:15.0f} {s['wall_s']:5.0f} {s['overhead_s']:9.0f}")
    print("floor: shared-memory round trip to an echo process (hardware/transport.py), us: "
          + ", ".join(f"{n} B {t:.0f}" for n, t in report["shm_round_trip_us"].items()))
    print(f"main-process RSS drop when the remote experts' weights are released: {report['main_rss_drop_mb']:.1f} MB "
          f"(their bytes: {report['remote_expert_mb']:.1f} MB); function RSS "
          f"{statistics.mean(report['function_rss_mb'].values()):.0f} MB, USS "
          f"{statistics.mean(report['function_uss_mb'].values()):.0f} MB, cold start "
          f"{statistics.mean(report['cold_start_s'].values()):.2f} s (all started at once)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
