"""`moeserve bench`: replay a real workload against a local server; optionally a plain-HF baseline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.table import Table

from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json
from moeserve.errors import MoeServeError


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.1f}"


def summary_table(title: str, summaries: list) -> Table:
    t = Table(title=title)
    for col in ("system", "ok / sent", "429", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
                "cost USD"):
        t.add_column(col, justify="right" if col != "system" else "left")
    for s in summaries:
        t.add_row(s.name, f"{s.completed} / {s.requests}", str(s.rejected), f"{s.requests_per_s:.2f}",
                  f"{s.output_tokens_per_s:,.1f}",
                  " / ".join(_ms(s.ttft_s[k]) for k in ("p50", "p90", "p99")),
                  " / ".join(_ms(s.tpot_s[k]) for k in ("p50", "p90", "p99")),
                  "-" if s.cost_usd is None else f"{s.cost_usd:.6f}")
    return t


@app.command("bench")
def bench_cmd(
    url: str = typer.Option(None, "--url", help="A running moeserve server on this machine (http://127.0.0.1:PORT)."),
    model: str = typer.Option(None, "--model", help="Serve this model in-process instead (default: demo)."),
    plan: str = typer.Option(None, "--plan", help="With --model: the plan to serve it with."),
    workload: str = typer.Option("azure-conv", "--workload", help="azure-conv, azure-code, poisson or closed."),
    rate: float = typer.Option(None, "--rate", min=0.0, help="Requests per second (default: twice what one "
                               "request at a time could serve, measured)."),
    duration: float = typer.Option(60.0, "--duration", min=1.0, help="Seconds of arrivals to replay."),
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
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Replay real arrival times with real prompts and report TTFT/TPOT p50/p90/p99, throughput, errors, cost.

    Stops by itself: arrivals end after --duration, stragglers are cut 120 s later. Targets 127.0.0.1 only.

    Example: moeserve bench --workload azure-conv --duration 60 --baseline hf --plot bench.png
    """
    from moeserve.models.loading import load_model, load_tokenizer, resolve_device
    from moeserve.serving import bench
    from moeserve.workloads import load_prompts

    if threads:
        import torch

        torch.set_num_threads(threads)
    if url and (model or plan):
        raise MoeServeError("give --url or --model/--plan, not both")
    if baseline not in (None, "hf"):
        raise MoeServeError(f"unknown baseline {baseline!r} (valid: hf)")
    if workload not in bench.WORKLOADS:
        raise MoeServeError(f"unknown workload {workload!r} (valid: {', '.join(bench.WORKLOADS)})")
    if rate is not None and rate <= 0:
        raise MoeServeError("--rate must be positive")
    engine = server = None
    try:
        if url:
            url = bench.check_local_url(url)
        else:
            from moeserve.serving.api import BackgroundServer
            from moeserve.serving.engine import Engine

            console.print(f"loading {model or 'demo'} and serving it in-process ...")
            engine = Engine.from_model_dir(model or "demo", plan=plan, device=device, max_batch=max_batch,
                                           max_queue=4096)
            server = BackgroundServer(engine, api_key=api_key).__enter__()
            url = server.url
        info = bench.server_info(url, api_key)
        root = info.get("root")
        tokenizer = load_tokenizer(root) if root and Path(root).is_dir() else None
        token_len = (lambda text: len(tokenizer(text)["input_ids"])) if tokenizer else (lambda text: len(text) // 4)
        prompt_set = load_prompts(prompts, seed=seed)
        context = info.get("max_model_len")

        if workload != "closed" and rate is None:
            sample = bench.build_workload(workload, prompt_set, rate=1.0, duration_s=duration, max_tokens=max_tokens,
                                          token_len=token_len, context_limit=context, seed=seed)
            probe = sorted(sample, key=lambda r: (r.max_tokens, token_len(r.prompt)))[len(sample) // 2]
            console.print("calibrating the request rate ...")
            rate = bench.calibrate_rate(url, probe, api_key, info["id"])
        requests = bench.build_workload(workload, prompt_set, rate=rate, duration_s=duration, max_tokens=max_tokens,
                                        token_len=token_len, context_limit=context, seed=seed)
        what = (f"{concurrency} closed-loop clients" if workload == "closed"
                else f"{len(requests)} requests at {rate:.2f} req/s")
        console.print(f"replaying {workload}: {what} for {duration:.0f} s against {url} ...")
        cost0 = bench.scrape_cost(url, api_key)
        results, wall = asyncio.run(bench.replay(url, requests, duration_s=duration, api_key=api_key,
                                                 concurrency=concurrency if workload == "closed" else None,
                                                 model=info["id"]))
        cost1 = bench.scrape_cost(url, api_key)
        cost = None if cost0 is None or cost1 is None else cost1 - cost0
        summaries = [bench.summarize(f"moeserve ({info['id']})", results, wall, cost)]
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        if engine is not None:
            engine.shutdown()

    if baseline == "hf":
        path = model or root
        if not path:
            raise MoeServeError("--baseline hf needs --model (the server does not say where its model is)")
        console.print(f"running the plain transformers baseline on the same prompts for {duration:.0f} s ...")
        hf_model = load_model(path, device=resolve_device(device))
        hf_tok = load_tokenizer(path)
        ordered = requests if workload != "closed" else requests[: len(results)]
        res, wall = bench.hf_baseline(hf_model, hf_tok, ordered, duration)
        if workload == "closed":  # no arrival times: service times, one request after the other
            summaries.append(bench.summarize("transformers generate", res, wall))
        else:  # the same arrivals, served one at a time: waits included
            res, wall = bench.fifo_replay([r.arrival_s for r in ordered], res)
            summaries.append(bench.summarize("transformers generate (FIFO)", res, wall))

    title = f"{workload}, {duration:.0f} s" + (f", {rate:.2f} req/s" if workload != "closed" else
                                               f", {concurrency} clients")
    if plot_path is not None:
        bench.plot(summaries, plot_path, title)
    if json_out:
        emit_json({"url": url, "model": info["id"], "workload": workload, "rate": rate, "duration_s": duration,
                   "concurrency": concurrency if workload == "closed" else None,
                   "results": [s.to_dict() for s in summaries],
                   "plot": str(plot_path) if plot_path else None})
        return
    console.print(summary_table(title, summaries))
    for s in summaries:
        errors = [r.error for r in s.results if not r.ok]
        if errors:
            console.print(f"[yellow]{s.name}: {len(errors)} failed request(s), e.g. {errors[0]}[/]")
    if plot_path is not None:
        console.print(f"plot: {plot_path}")
