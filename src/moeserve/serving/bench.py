"""`moeserve bench`: replay real arrivals with real prompts against a local server, plus a plain HF baseline.

Workloads:
- azure-conv / azure-code: the Azure LLM inference trace (Splitwise, ISCA 2024) time-scaled to `rate`
  req/s; each arrival gets a real prompt of the same length rank (workloads.pair_prompts) and asks for the
  trace's generated-token count (capped), with `ignore_eos` so the load is what the trace says;
- poisson: exponential inter-arrival gaps at `rate`;
- closed: `concurrency` clients each sending their next request as soon as the last one finished.

Every request streams, so TTFT (send -> first token) and TPOT ((last - first token) / (tokens - 1)) are
measured by the client. The HF baseline runs `model.generate` on the same prompts one at a time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from moeserve.atomic import atomic_file, check_output_file
from moeserve.engine.build import EngineOptions, build_engine
from moeserve.engine.config import EngineConfig
from moeserve.errors import MoeServeError
from moeserve.experts.expert_cache import ExpertCacheOptions
from moeserve.models.loading import load_model, load_tokenizer, resolve_device
from moeserve.serving.api import ServerConfig
from moeserve.serving.server import BackgroundServer
from moeserve.workloads import load_arrivals, load_prompts, pair_prompts, scale_arrivals

WORKLOADS = ("azure-conv", "azure-code", "poisson", "closed")
CALIBRATION_S = 8.0  # a closed loop this long measures what the server sustains
LOAD_FRACTION = 0.8  # the calibrated rate: this share of the measured sustained throughput
GRACE_S = 5.0  # after the last arrival, requests still open this long later are cut (counted unfinished)
UNFINISHED = "unfinished at the deadline"


@dataclass(frozen=True)
class BenchRequest:
    arrival_s: float  # when to send, from the start of the replay (closed loop: ignored)
    prompt: str
    max_tokens: int
    domain: str | None = None


@dataclass(frozen=True)
class RequestResult:
    sent_s: float  # from the start of the run
    ok: bool
    status: int  # HTTP status (0: no response)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class BenchSummary:
    """One system's figures. Percentiles are over successful requests; throughput over the run's wall time."""

    name: str
    requests: int
    completed: int
    errors: int
    rejected: int  # HTTP 429
    cut: int  # still open GRACE_S after the last arrival: cut by the client (the server saw a disconnect)
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_s: dict[str, float | None]  # p50, p90, p99, mean
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    cost_usd: float | None = None
    results: list[RequestResult] = field(default_factory=list, repr=False)

    def to_dict(self, with_requests: bool = False) -> dict:
        d = asdict(self)
        if not with_requests:
            d.pop("results")
        return d


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean())}


def summarize(name: str, results: list[RequestResult], wall_s: float, cost_usd: float | None = None
              ) -> BenchSummary:
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return BenchSummary(
        name=name, requests=len(results), completed=len(ok), errors=len(results) - len(ok),
        rejected=sum(r.status == 429 for r in results), cut=sum(r.error == UNFINISHED for r in results),
        wall_s=wall_s,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_s=_percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=_percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        e2e_s=_percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        cost_usd=cost_usd, results=results)


# ------------------------------------------------------------------------------------------- workload
def poisson_arrivals(rate: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """[requests] float seconds of a Poisson process at `rate` req/s within [0, duration_s]."""
    rng = np.random.default_rng(seed)
    expected = max(1, math.ceil(rate * duration_s * 1.5 + 10))
    times = np.cumsum(rng.exponential(1.0 / rate, size=expected))
    times = times[times <= duration_s]
    return np.concatenate([[0.0], times]) if times.size == 0 or times[0] > 0 else times


def build_workload(workload: str, prompts: list, *, rate: float | None, duration_s: float, max_tokens: int,
                   token_len, context_limit: int | None, seed: int = 0, default_tokens: int = 64
                   ) -> list[BenchRequest]:
    """The requests of a run. prompts: workloads.Prompt list; token_len(text) -> prompt tokens.

    Prompts that cannot fit the context with at least one output token are left out; max_tokens is cut so
    prompt + output fits.
    """
    if workload not in WORKLOADS:
        raise MoeServeError(f"unknown workload {workload!r} (valid: {', '.join(WORKLOADS)})")
    lengths = {p.text: token_len(p.text) for p in prompts}
    if context_limit:
        prompts = [p for p in prompts if lengths[p.text] < context_limit - 1]
    if not prompts:
        raise MoeServeError("no prompt fits the model's context length")

    def fit(text: str, want: int) -> int:
        want = int(min(max(want, 1), max_tokens))
        return min(want, context_limit - lengths[text]) if context_limit else want

    if workload in ("azure-conv", "azure-code"):

        trace = scale_arrivals(load_arrivals(workload), rate=rate, duration_s=duration_s)
        picks = pair_prompts(trace, prompts, lambda text: lengths[text], seed=seed)
        return [BenchRequest(float(t), prompts[i].text, fit(prompts[i].text, int(g)), prompts[i].domain)
                for t, i, g in zip(trace.arrival_s, picks, trace.generated_tokens, strict=True)]
    rng = np.random.default_rng(seed)
    if workload == "poisson":
        times = poisson_arrivals(rate, duration_s, seed)
    else:  # closed loop: arrival times unused; enough requests for the duration, cut at the deadline
        times = np.zeros(max(64, int(duration_s * 20)))
    order = rng.integers(0, len(prompts), size=len(times))
    return [BenchRequest(float(t), prompts[i].text, fit(prompts[i].text, default_tokens), prompts[i].domain)
            for t, i in zip(times, order, strict=True)]


# --------------------------------------------------------------------------------------------- client
def check_local_url(url: str) -> str:
    """The bench only ever targets this machine."""
    parsed = urlparse(url)
    if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise MoeServeError(f"--url must be http://127.0.0.1:PORT (the bench only targets this machine), got {url}")
    return url.rstrip("/")


async def _one(client, url: str, req: BenchRequest, headers: dict, t0: float, model: str | None) -> RequestResult:
    body = {"prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    sent = time.perf_counter()
    first = last = None
    streamed, usage = 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                return RequestResult(sent - t0, False, response.status_code, error=text)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(sent - t0, False, 200, error=str(chunk["error"])[:200])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    n = len(choice.get("token_ids") or ()) or (1 if choice.get("text") else 0)
                    if n:
                        first, last = first or time.perf_counter(), time.perf_counter()
                        streamed += n
    except Exception as exc:  # connection refused/reset, timeout: the request is lost
        return RequestResult(sent - t0, False, 0, error=f"{type(exc).__name__}: {exc}"[:200])
    done = time.perf_counter()
    if first is None:
        return RequestResult(sent - t0, False, 200, error="no token received")
    prompt_tokens, tokens = (usage["prompt_tokens"], usage["completion_tokens"]) if usage else (0, streamed)
    return RequestResult(sent - t0, True, 200, prompt_tokens, tokens, first - sent,
                         (last - first) / (tokens - 1) if tokens > 1 else None, done - sent)


async def replay(url: str, requests: list[BenchRequest], *, duration_s: float, api_key: str | None = None,
                 concurrency: int | None = None, grace_s: float = GRACE_S, model: str | None = None
                 ) -> tuple[list[RequestResult], float]:
    """Send `requests` at their arrival times (or closed-loop with `concurrency` clients) -> results, wall s.

    Bounded: nothing is sent after `duration_s`; requests still open `grace_s` later are cut and count as
    errors ("unfinished at the deadline"), so a run ends within a few seconds of its duration.
    """

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(duration_s + grace_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrency:
            pending = iter(requests)
            results: list[RequestResult] = []

            async def worker():
                for req in pending:
                    if time.perf_counter() - t0 > duration_s:
                        return
                    results.append(await _one(client, url, req, headers, t0, model))

            workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
            _, late = await asyncio.wait(workers, timeout=duration_s + grace_s)
            for task in late:  # each holds one unfinished request
                task.cancel()
            results += [RequestResult(0.0, False, 0, error=UNFINISHED) for _ in late]
            return results, time.perf_counter() - t0

        async def at(req: BenchRequest):
            await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
            return await _one(client, url, req, headers, t0, model)

        tasks = [asyncio.create_task(at(r)) for r in requests if r.arrival_s <= duration_s]
        done, late = await asyncio.wait(tasks, timeout=duration_s + grace_s)
        for task in late:
            task.cancel()
        results = [t.result() for t in tasks if t in done]
        results += [RequestResult(0.0, False, 0, error=UNFINISHED) for _ in late]
        return results, time.perf_counter() - t0


async def _get_json(url: str, path: str, api_key: str | None) -> dict:

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(f"{url}{path}", headers=headers)
        if r.status_code != 200:
            raise MoeServeError(f"{url}{path} answered HTTP {r.status_code}: {r.text[:200]}")
        return r.json()


def server_info(url: str, api_key: str | None = None) -> dict:
    """The served model's /v1/models entry (id, root = local path, max_model_len)."""

    try:
        models = asyncio.run(_get_json(url, "/v1/models", api_key))
    except httpx.HTTPError as exc:
        raise MoeServeError(f"no server at {url}: {type(exc).__name__}") from None
    return models["data"][0]


def scrape_cost(url: str, api_key: str | None = None) -> float | None:
    """Total of moeserve_cost_usd_total in /metrics, or None when the server reports no cost."""

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    except httpx.HTTPError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("moeserve_cost_usd_total")]
    return sum(values) if values else None


def calibrate_rate(url: str, sample: list[BenchRequest], concurrency: int, api_key: str | None = None,
                   model: str | None = None) -> tuple[float, float]:
    """What the server sustains: `concurrency` closed-loop clients (its batch size) send the workload's own
    requests for CALIBRATION_S seconds. -> (the rate to offer: LOAD_FRACTION of the measured throughput,
    the measured throughput in requests/s)."""
    async def once() -> RequestResult:
        async with httpx.AsyncClient(timeout=600) as client:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            return await _one(client, url, sample[0], headers, time.perf_counter(), model)

    warm = asyncio.run(once())  # first-call allocations, untimed
    if not warm.ok:
        raise MoeServeError(f"calibration request failed: {warm.error}")
    results, wall = asyncio.run(replay(url, sample, duration_s=CALIBRATION_S, api_key=api_key,
                                       concurrency=concurrency, grace_s=300, model=model))
    done = sum(r.ok for r in results)
    if done == 0:
        raise MoeServeError("calibration: no request completed")
    sustained = done / wall
    return LOAD_FRACTION * sustained, sustained


# ------------------------------------------------------------------------------------------- baseline
def hf_baseline(model, tokenizer, requests: list[BenchRequest], budget_s: float) -> tuple[list[RequestResult], float]:
    """Plain `model.generate` (greedy, no EOS stop: the same token counts) of each prompt in turn, until
    `budget_s` is spent. TTFT and TPOT come from a streamer's timestamps."""

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    results = []
    device = next(model.parameters()).device
    if requests:  # warm-up (first-call allocations), untimed
        with torch.inference_mode():
            model.generate(tokenizer(requests[0].prompt, return_tensors="pt")["input_ids"].to(device),
                           do_sample=False, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id or 0)
    t0 = time.perf_counter()
    for req in requests:
        if time.perf_counter() - t0 > budget_s:
            break
        ids = tokenizer(req.prompt, return_tensors="pt")["input_ids"].to(device)
        clock = Clock()
        sent = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=req.max_tokens, min_new_tokens=req.max_tokens, streamer=clock,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        done = time.perf_counter()
        n = out.shape[1] - ids.shape[1]
        first = clock.times[1] if len(clock.times) > 1 else done  # times[0]: the prompt itself
        results.append(RequestResult(sent - t0, True, 200, ids.shape[1], n, first - sent,
                                     (done - first) / (n - 1) if n > 1 else None, done - sent))
    return results, time.perf_counter() - t0


def fifo_replay(arrival_s: list[float], service: list[RequestResult]) -> tuple[list[RequestResult], float]:
    """What a server running one request at a time (first come, first served) would have given for these
    arrivals, from each request's measured service times: request i starts at max(its arrival, the
    previous finish), so its TTFT and latency include the wait. -> results, wall time (first arrival to
    last finish).
    """
    results, free_at = [], 0.0
    for arrival, r in zip(arrival_s, service, strict=False):
        start = max(arrival, free_at)
        wait = start - arrival
        free_at = start + r.e2e_s
        results.append(RequestResult(arrival, r.ok, r.status, r.prompt_tokens, r.completion_tokens,
                                     wait + r.ttft_s, r.tpot_s, wait + r.e2e_s))
    wall = free_at - (arrival_s[0] if results else 0.0)
    return results, wall


# ------------------------------------------------------------------------------------------------ plot
def plot(summaries: list[BenchSummary], path, title: str = "") -> None:
    """TTFT and TPOT distributions per system, and requests in flight over time (server only)."""
    import matplotlib  # heavy (~1 s) and only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for s in summaries:
        for ax, key in ((axes[0], "ttft_s"), (axes[1], "tpot_s")):
            values = np.sort([getattr(r, key) for r in s.results if r.ok and getattr(r, key) is not None])
            if values.size:
                ax.plot(values * 1000, np.arange(1, values.size + 1) / values.size,
                        label=f"{s.name} ({s.output_tokens_per_s:.0f} tok/s)")
    axes[0].set_xscale("log")  # queueing spreads TTFT over orders of magnitude
    for ax, name in ((axes[0], "TTFT"), (axes[1], "TPOT")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    server = summaries[0]
    spans = [(r.sent_s, r.sent_s + r.e2e_s) for r in server.results if r.ok and r.e2e_s is not None]
    if spans:
        grid = np.linspace(0, max(end for _, end in spans), 400)
        in_flight = [sum(a <= t < b for a, b in spans) for t in grid]
        axes[2].plot(grid, in_flight)
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel(f"{server.name}: requests in flight")
    axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@dataclass(frozen=True)
class BenchOptions:
    """What `moeserve bench` runs: against `url`, or serving `model` (with `plan`) in this process."""

    url: str | None = None
    model: str | None = None
    plan: str | None = None
    workload: str = "azure-conv"
    rate: float | None = None  # None: calibrated
    duration: float = 60.0
    concurrency: int = 8
    baseline: str | None = None  # "hf": plain transformers generate on the same prompts
    prompts: str = "builtin:mixed"
    max_tokens: int = 128
    max_batch: int = 8
    api_key: str | None = None
    device: str = "auto"
    seed: int = 0
    plot_path: Path | None = None
    expert_cache: ExpertCacheOptions | None = None  # with --model: serve it with an expert cache


@dataclass
class BenchReport:
    url: str
    model: str
    rate: float | None
    summaries: list[BenchSummary]
    expert_cache: dict | None = None  # the served engine's cache totals over the run (ExpertCaches.totals)


def run_bench(options: BenchOptions, log: Callable[[str], None] = print) -> BenchReport:
    """Replay the workload against the server (and the HF baseline), write the plot; -> the summaries."""
    url, model, plan, workload, rate = options.url, options.model, options.plan, options.workload, options.rate
    duration, concurrency, baseline, prompts = options.duration, options.concurrency, options.baseline, options.prompts
    max_tokens, max_batch, api_key, device, seed = (options.max_tokens, options.max_batch, options.api_key,
                                                    options.device, options.seed)
    plot_path = options.plot_path
    if url and (model or plan):
        raise MoeServeError("give --url or --model/--plan, not both")
    if options.expert_cache is not None and (url or plan):
        raise MoeServeError("--expert-cache: the bench serves the model itself (give --model, no --url or --plan)")
    if baseline not in (None, "hf"):
        raise MoeServeError(f"unknown baseline {baseline!r} (valid: hf)")
    if workload not in WORKLOADS:
        raise MoeServeError(f"unknown workload {workload!r} (valid: {', '.join(WORKLOADS)})")
    if plot_path is not None:
        check_output_file(plot_path, "--plot")
    engine = server = None
    cache_totals = None
    try:
        if url:
            url = check_local_url(url)
        else:
            log(f"loading {model or 'demo'} and serving it in-process ...")
            engine = build_engine(EngineOptions(model or "demo", plan, plan is None, device,
                                                EngineConfig(max_batch=max_batch, max_queue=4096),
                                                expert_cache=options.expert_cache))
            server = BackgroundServer(engine, ServerConfig(api_key=api_key)).__enter__()
            url = server.url
        info = server_info(url, api_key)
        root = info.get("root")
        tokenizer = load_tokenizer(root) if root and Path(root).is_dir() else None
        token_len = (lambda text: len(tokenizer(text)["input_ids"])) if tokenizer else (lambda text: len(text) // 4)
        prompt_set = load_prompts(prompts, seed=seed)
        context = info.get("max_model_len")

        if workload != "closed" and rate is None:
            sample = build_workload("closed", prompt_set, rate=None, duration_s=duration, max_tokens=max_tokens,
                                    token_len=token_len, context_limit=context, seed=seed,
                                    default_tokens=_median_generated(workload, max_tokens))
            log(f"calibrating the request rate: {CALIBRATION_S:.0f} s of {max_batch} closed-loop clients ...")
            rate, sustained = calibrate_rate(url, sample, max_batch, api_key, info["id"])
            log(f"the server sustains {sustained:.2f} req/s: offering {rate:.2f} req/s ({LOAD_FRACTION:.0%})")
        requests = build_workload(workload, prompt_set, rate=rate, duration_s=duration, max_tokens=max_tokens,
                                        token_len=token_len, context_limit=context, seed=seed)
        what = (f"{concurrency} closed-loop clients" if workload == "closed"
                else f"{len(requests)} requests at {rate:.2f} req/s")
        log(f"replaying {workload}: {what} for {duration:.0f} s against {url} ...")
        cost0 = scrape_cost(url, api_key)
        results, wall = asyncio.run(replay(url, requests, duration_s=duration, api_key=api_key,
                                                 concurrency=concurrency if workload == "closed" else None,
                                                 model=info["id"]))
        cost1 = scrape_cost(url, api_key)
        if engine is not None and engine.dispatch.caches is not None:
            cache_totals = engine.dispatch.caches.totals()  # calibration included: the cache is warm across it
        cost = None if cost0 is None or cost1 is None else cost1 - cost0
        summaries = [summarize(f"moeserve ({info['id']})", results, wall, cost)]
        if workload != "closed" and summaries[0].requests_per_s < 0.9 * rate * min(1.0, duration / max(wall, 1e-9)):
            log(f"warning: the server did not keep up: {rate:.2f} req/s offered, {summaries[0].requests_per_s:.2f} "
                "completed (overloaded: lower --rate)")
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        if engine is not None:
            engine.shutdown()

    if baseline == "hf":
        path = model or root
        if not path:
            raise MoeServeError("--baseline hf needs --model (the server does not say where its model is)")
        log(f"running the plain transformers baseline on the same prompts for {duration:.0f} s ...")
        hf_model = load_model(path, device=resolve_device(device))
        hf_tok = load_tokenizer(path)
        ordered = requests if workload != "closed" else requests[: len(results)]
        res, wall = hf_baseline(hf_model, hf_tok, ordered, duration)
        if workload == "closed":  # no arrival times: service times, one request after the other
            summaries.append(summarize("transformers generate", res, wall))
        else:  # the same arrivals, served one at a time: waits included
            res, wall = fifo_replay([r.arrival_s for r in ordered], res)
            summaries.append(summarize("transformers generate (FIFO)", res, wall))

    if plot_path is not None:
        title = f"{workload}, {duration:.0f} s" + (f", {rate:.2f} req/s" if workload != "closed" else
                                                   f", {concurrency} clients")
        plot(summaries, plot_path, title)
    return BenchReport(url, info["id"], rate, summaries, cache_totals)


def _median_generated(workload: str, cap: int) -> int:
    """Tokens per request the calibration asks for: the workload's median generated count (capped)."""
    if workload in ("azure-conv", "azure-code"):
        return int(min(max(np.median(load_arrivals(workload).generated_tokens), 1), cap))
    return min(64, cap)
