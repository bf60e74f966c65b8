"""`moeserve bench`: replay a real workload against a local server; optionally a plain-HF baseline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moeserve import defaults
from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json
from moeserve.cli.validate import POSITIVE, choice, number


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.1f}"


def summary_table(title: str, summaries: list) -> Table:
    t = Table(title=title)
    for col in ("system", "ok / sent", "429", "cut", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
                "cost USD"):
        t.add_column(col, justify="right" if col != "system" else "left")
    for s in summaries:
        t.add_row(s.name, f"{s.completed} / {s.requests}", str(s.rejected), str(s.cut),
                  f"{s.requests_per_s:.2f}",
                  f"{s.output_tokens_per_s:,.1f}",
                  " / ".join(_ms(s.ttft_s[k]) for k in ("p50", "p90", "p99")),
                  " / ".join(_ms(s.tpot_s[k]) for k in ("p50", "p90", "p99")),
                  "-" if s.cost_usd is None else f"{s.cost_usd:.6f}")
    return t


def cache_line(c: dict, settings: str) -> str:
    """One line of the served engine's expert-cache totals (ExpertCaches.totals)."""
    return (f"expert cache ({settings}, {c['read_mode']} reads): hit rate {c['hit_rate']:.1%}, {c['misses']} misses, "
            f"{c['bytes_read'] / 1e6:.1f} MB read, {c['stall_s']:.2f} s stalled")


@app.command("bench")
def bench_cmd(
    url: str = typer.Option(None, "--url", help="A running moeserve server on this machine (http://127.0.0.1:PORT)."),
    model: str = typer.Option(None, "--model", help="Serve this model in-process instead (default: demo)."),
    plan: str = typer.Option(None, "--plan", help="With --model: the plan to serve it with."),
    workload: str = typer.Option("azure-conv", "--workload", help="azure-conv, azure-code, poisson or closed."),
    rate: float = typer.Option(None, "--rate", parser=POSITIVE, help="Requests per second (default: twice what one "
                               "request at a time could serve, measured)."),
    duration: float = typer.Option(60.0, "--duration", parser=number(low=1.0), help="Seconds of arrivals to replay."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Clients of the closed workload."),
    baseline: str = typer.Option(None, "--baseline", help="'hf': also run plain transformers generate on the "
                                 "same prompts, one at a time, for the same duration (latencies as if it "
                                 "had served the same arrivals first come, first served)."),
    prompts: str = typer.Option("builtin:mixed", "--prompts", help="Prompt source (builtin:NAME, .jsonl, .txt)."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Cap on the tokens asked per request."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="With --model: the server's max batch."),
    api_key: str = typer.Option(None, "--api-key", envvar="MOESERVE_API_KEY", help="The server's API key."),
    device: str = typer.Option("auto", "--device", help="With --model or --baseline: auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of prompt pairing and Poisson arrivals."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch in this process (0: default)."),
    plot_path: Path = typer.Option(None, "--plot", help="Write TTFT/TPOT/in-flight plots to this PNG."),
    expert_cache: int = typer.Option(None, "--expert-cache", min=1, help="With --model (or the demo): serve it "
                                     "with at most C experts per MoE layer in memory (docs/expert-cache.md)."),
    cache_policy: str = typer.Option(defaults.EXPERT_CACHE_POLICY, "--cache-policy", parser=choice(*defaults.EXPERT_CACHE_POLICIES), help="lru or lfu."),
    prefetch: str = typer.Option(defaults.EXPERT_CACHE_PREFETCH, "--prefetch", parser=choice(*defaults.EXPERT_CACHE_PREFETCHES), help="none or router."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Replay real arrival times with real prompts and report TTFT/TPOT p50/p90/p99, throughput, errors, cost.

    Stops by itself: arrivals end after --duration, requests still open 5 s later are cut ("cut"). Targets 127.0.0.1 only.

    Example: moeserve bench --workload azure-conv --duration 60 --baseline hf --plot bench.png
    With an expert cache: moeserve bench --model demo --expert-cache 8 --workload closed --duration 20
    """
    from moeserve.experts.expert_cache import ExpertCacheOptions
    from moeserve.serving.bench import BenchOptions, run_bench

    if threads:
        import torch

        torch.set_num_threads(threads)
    report = run_bench(BenchOptions(url, model, plan, workload, rate, duration, concurrency, baseline, prompts, max_tokens,
                                    max_batch, api_key, device, seed, plot_path,
                                    ExpertCacheOptions(expert_cache, cache_policy, prefetch) if expert_cache else None),
                       log=console.print)
    summaries, rate = report.summaries, report.rate
    title = f"{workload}, {duration:.0f} s" + (f", {rate:.2f} req/s" if workload != "closed" else
                                               f", {concurrency} clients")
    if json_out:
        emit_json({"url": report.url, "model": report.model, "workload": workload, "rate": rate, "duration_s": duration,
                   "concurrency": concurrency if workload == "closed" else None,
                   "results": [s.to_dict() for s in summaries],
                   "plot": str(plot_path) if plot_path else None, "expert_cache": report.expert_cache})
        return
    console.print(summary_table(title, summaries))
    if report.expert_cache is not None:
        console.print(cache_line(report.expert_cache, f"{expert_cache} per layer, {cache_policy}, prefetch {prefetch}"))
    for s in summaries:
        errors = [r.error for r in s.results if not r.ok]
        if errors:
            console.print(f"[yellow]{s.name}: {len(errors)} failed request(s), e.g. {errors[0]}[/]")
    if plot_path is not None:
        console.print(f"plot: {plot_path}")
