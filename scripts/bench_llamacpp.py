"""llama.cpp's llama-server beside moeserve: same run, same model, same threads, same client (docs/llamacpp.md).

    MOESERVE_LLAMA_SERVER=/path/to/llama-server MOESERVE_DEMO_GGUF=/path/to/demo-f32.gguf \\
        python scripts/bench_llamacpp.py [--threads 2] [--rounds 3] [--json-out llamacpp.json]

Three servers of the demo model run side by side for the whole run: `llama-server -np 8 -t THREADS`
(continuous batching), `moeserve serve demo --all-local --threads THREADS`, and the same with a plan that
puts half of every MoE layer's experts (the odd ones) in expert functions. Each round measures every
server in turn (the order rotates from round to round; the machine's load average is recorded before and
after each), with one client (httpx, streaming /v1/completions, prompts sent as the same token ids,
greedy, `ignore_eos` so every server generates exactly `max_tokens`):

  decode   one request at batch 1: TPOT = (last token time - first token time) / (tokens - 1)
  prefill  one long prompt with max_tokens 1: prompt tokens / TTFT (llama-server's prompt cache is off)
  8-client closed loop for --duration s: each client sends its next request when the last one finished;
           output tokens/s = tokens received in the window / window

Figures are medians over the rounds (min and max in the JSON). Without the two environment variables (or
with missing files) the script prints how to build them and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ENGINES = ("llama.cpp", "moeserve", "moeserve-half")
LABELS = {"llama.cpp": "llama.cpp llama-server", "moeserve": "moeserve all-local",
          "moeserve-half": "moeserve half-remote"}
METRICS = (  # key, column label, unit, higher is better
    ("tpot_ms", "decode TPOT b=1", "ms", False),
    ("prefill_tok_s", "prefill", "tok/s", True),
    ("conc_tok_s", "8 clients out", "tok/s", True),
)


# ---------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    info: dict = field(default_factory=dict)

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server and its child processes (expert functions)."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # moeserve drains and stops its expert functions; llama-server exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_llama(binary: str, gguf: str, threads: int, slots: int, ctx_per_slot: int, work: Path) -> Server:
    import httpx

    port = free_port()
    cmd = [binary, "-m", gguf, "-t", str(threads), "-tb", str(threads), "-np", str(slots),
           "-c", str(slots * ctx_per_slot), "-cb", "--cache-ram", "0", "--host", "127.0.0.1",
           "--port", str(port), "-a", "demo", "--no-webui"]
    log = work / "llama-server.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                props = httpx.get(url + "/props", timeout=5).json()
                info = {"cmd": cmd, "build_info": props.get("build_info"),
                        "n_ctx": (props.get("default_generation_settings") or {}).get("n_ctx"),
                        "total_slots": props.get("total_slots")}
                return Server("llama.cpp", url, proc, log, info)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"llama-server not ready after 120 s:\n{tail(log)}")


def moeserve_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "moeserve"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("moeserve")
    return [found] if found else [sys.executable, "-c", "from moeserve.cli.app import main; main()"]


def start_moeserve(name: str, threads: int, slots: int, plan: Path | None, work: Path) -> Server:
    cmd = moeserve_cmd() + ["serve", "demo", "--threads", str(threads), "--port", "0", "--json",
                            "--max-batch", str(slots), "--log-level", "warning"]
    cmd += ["--plan", str(plan)] if plan else ["--all-local"]
    log = work / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), stdin=subprocess.DEVNULL,
                            text=True)
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:  # keeps reading stdout for the server's life, so its pipe never fills
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail(log)}") from None
            continue
        if line.startswith("{"):
            info = json.loads(line)
            info["cmd"] = cmd
            return Server(name, info["url"].rstrip("/"), proc, log, info)
    proc.kill()
    raise RuntimeError(f"{name} not ready after 240 s:\n{tail(log)}")


def inspect_geometry() -> dict:
    out = subprocess.run(moeserve_cmd() + ["inspect", "demo", "--json"], check=True, capture_output=True, text=True)
    geo = json.loads(out.stdout)
    geo.pop("model", None)
    return geo


def write_half_plan(path: Path, geo: dict) -> Path:
    """moeserve.plan/1: even experts local in the main process, odd ones in one expert function per layer."""
    import yaml

    layers, n = [int(x) for x in geo["moe_layers"]], int(geo["num_experts"])
    plan = {
        "schema": "moeserve.plan/1", "strategy": "manual", "model": "demo", "geometry": geo,
        "main": {"device": "cpu", "expert_device": "cpu",
                 "local_experts": {la: list(range(0, n, 2)) for la in layers},
                 "gpu_memory_mb": 0, "cpu_memory_mb": 0},
        "functions": [{"id": f"L{la}-r0", "layer": la, "experts": list(range(1, n, 2)), "memory_mb": 512,
                       "vcpus": 0.0, "keep_alive_s": 3600.0, "group": f"L{la}"} for la in layers],
        "predicted": {}, "baselines": {},
        "inputs": {"note": "scripts/bench_llamacpp.py: half of each layer's experts remote"},
        "extra": {}, "moeserve_version": metadata.version("moeserve"), "created": "",
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False, width=120))
    return path


# ----------------------------------------------------------------------------------------------- client
def request_body(engine: str, ids: list[int], max_tokens: int) -> dict:
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if engine == "llama.cpp":
        # timings_per_token: each chunk's timings.predicted_n counts the tokens so far; no prompt cache reuse
        body.update(timings_per_token=True, cache_prompt=False)
    else:
        body["return_token_ids"] = True
    return body


async def stream_one(client, engine: str, url: str, ids: list[int], max_tokens: int,
                     on_tokens=None, collect_ids: bool = False) -> dict:
    """One streaming completion: token arrival times (one entry per token, chunk time); with collect_ids
    also the generated token ids (llama-server: its `verbose` debug field; not used while timing)."""
    body = request_body(engine, ids, max_tokens)
    if collect_ids and engine == "llama.cpp":
        body["verbose"] = True
    t0 = time.perf_counter()
    times: list[float] = []
    token_ids: list[int] = []
    predicted = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{engine}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{engine}: {chunk['error']}")
            now = time.perf_counter()
            if engine == "llama.cpp":
                timings = chunk.get("timings")
                if timings is not None:
                    n = int(timings.get("predicted_n", predicted)) - predicted
                else:
                    n = 1 if any(c.get("text") for c in chunk.get("choices", [])) else 0
                predicted += max(n, 0)
            else:
                n = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
            if n > 0:
                times.extend([now] * n)
                if on_tokens is not None:
                    on_tokens(now, n)
            if collect_ids:
                if engine == "llama.cpp":
                    token_ids += (chunk.get("__verbose") or {}).get("tokens") or []
                else:
                    token_ids += [t for c in chunk.get("choices", []) for t in c.get("token_ids") or []]
    return {"t0": t0, "times": times, "prompt_tokens": len(ids), "token_ids": token_ids}


async def generated_ids(engine: str, url: str, ids: list[int], max_tokens: int) -> list[int]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        return (await stream_one(client, engine, url, ids, max_tokens, collect_ids=True))["token_ids"]


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def measure_decode(engine: str, url: str, ids: list[int], max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        r = await stream_one(client, engine, url, ids, max_tokens)
    times = r["times"]
    n = len(times)
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan")
    return {"tpot_ms": tpot * 1e3, "tokens": n, "ttft_ms": (times[0] - r["t0"]) * 1e3 if times else None}


async def measure_prefill(engine: str, url: str, ids: list[int]) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        r = await stream_one(client, engine, url, ids, 1)
    ttft = r["times"][0] - r["t0"]
    return {"prefill_tok_s": len(ids) / ttft, "ttft_ms": ttft * 1e3, "prompt_tokens": len(ids)}


async def measure_concurrent(engine: str, url: str, prompts: list[list[int]], clients: int, duration: float,
                             max_tokens: int, offset: int) -> dict:
    import httpx

    counted = [0]
    finished = [0]
    short = [0]
    end = [float("inf")]

    def on_tokens(now: float, n: int) -> None:
        if now <= end[0]:
            counted[0] += n

    async def loop(i: int, client) -> None:
        k = 0
        while time.perf_counter() < end[0]:
            ids = prompts[(offset + i + k * clients) % len(prompts)]
            r = await stream_one(client, engine, url, ids, max_tokens, on_tokens)
            k += 1
            if r["times"] and r["times"][-1] <= end[0]:
                finished[0] += 1
                short[0] += len(r["times"]) != max_tokens

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        t0 = time.perf_counter()
        end[0] = t0 + duration
        tasks = [asyncio.create_task(loop(i, client)) for i in range(clients)]
        await asyncio.sleep(max(0.0, end[0] - time.perf_counter()))
        for t in tasks:  # close the streams still open: both servers cancel a request whose client left
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if errors:
        raise RuntimeError(f"{engine}: concurrent client failed: {errors[0]!r}")
    return {"conc_tok_s": counted[0] / duration, "conc_tokens": counted[0], "conc_requests_done": finished[0],
            "conc_requests_short": short[0]}


# ------------------------------------------------------------------------------------------------ setup
def build_prompts(tokenizer_path: Path, n_prompts: int, prefill_tokens: int):
    """Token ids (BOS + text, as moeserve's tokenizer encodes a string) of the builtin prompts, and
    long prompts of `prefill_tokens` tokens (the same prompts concatenated, in a rotating order)."""
    from tokenizers import Tokenizer

    from moeserve.workloads import load_prompts

    tok = Tokenizer.from_file(str(tokenizer_path))
    prompts = load_prompts("builtin:mixed", max_prompts=n_prompts)
    ids = [tok.encode(p.text).ids for p in prompts]  # the post-processor prepends <|bos|>
    bos = ids[0][0]
    bodies = [x[1:] for x in ids]

    def long_prompt(r: int) -> list[int]:
        out = [bos]
        j = 0
        while len(out) < prefill_tokens:
            out += bodies[(r + j) % len(bodies)]
            j += 1
        return out[:prefill_tokens]

    return ids, long_prompt


@contextlib.contextmanager
def cpu_meter(server: Server, row: dict, phase: str):
    """Cores used (CPU seconds / wall seconds) by the server (with its children) and by this client."""
    w0, s0, c0 = time.perf_counter(), server.cpu_s(), time.process_time()
    yield
    wall = time.perf_counter() - w0
    row[f"{phase}_server_cores"] = (server.cpu_s() - s0) / wall
    row[f"{phase}_client_cores"] = (time.process_time() - c0) / wall


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("moeserve", "torch", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


def summarize(values: list[float]) -> dict:
    vals = [v for v in values if v == v]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": values}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": values}


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for every server (default 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens of the batch-1 decode request")
    parser.add_argument("--prefill-tokens", type=int, default=768, help="tokens of the long prompt")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (and server slots)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of the concurrent window")
    parser.add_argument("--conc-max-tokens", type=int, default=32, help="max_tokens of each concurrent request")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--json-out", default=None, help="write every figure here as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (the folder is printed)")
    args = parser.parse_args()

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines: {sorted(unknown)}")
    binary, gguf = os.environ.get("MOESERVE_LLAMA_SERVER"), os.environ.get("MOESERVE_DEMO_GGUF")
    missing = [f"{k}={v or '(unset)'}" for k, v in (("MOESERVE_LLAMA_SERVER", binary), ("MOESERVE_DEMO_GGUF", gguf))
               if not v or not Path(v).is_file()]
    if missing and "llama.cpp" in engines:
        print(f"bench_llamacpp: skipped ({', '.join(missing)}): build llama-server and convert the demo model "
              "to GGUF as in docs/llamacpp.md, then set MOESERVE_LLAMA_SERVER and MOESERVE_DEMO_GGUF")
        return 0

    import moeserve  # the client stays light: no torch in this process

    demo_dir = Path(moeserve.__file__).resolve().parent / "assets" / "demo"
    prompts, long_prompt = build_prompts(demo_dir / "tokenizer.json", 16, args.prefill_tokens)
    ctx_per_slot = 1024  # the demo model's context length
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    servers: dict[str, Server] = {}
    load: list[dict] = []
    per_round: dict[str, list[dict]] = {e: [] for e in engines}
    started = time.perf_counter()
    try:
        print(f"starting {', '.join(engines)} at {args.threads} thread(s) ...", flush=True)
        for e in engines:
            if e == "llama.cpp":
                servers[e] = start_llama(binary, gguf, args.threads, args.clients, ctx_per_slot, work)
            elif e == "moeserve":
                servers[e] = start_moeserve(e, args.threads, args.clients, None, work)
            else:
                plan = write_half_plan(work / "half-remote.plan.yaml", inspect_geometry())
                servers[e] = start_moeserve(e, args.threads, args.clients, plan, work)
        same: dict[str, dict] = {}
        for e, s in servers.items():  # warm-up: first requests allocate caches, start threads
            got = {i: asyncio.run(generated_ids(e, s.url, prompts[i], 32)) for i in (0, 5)}
            same[e] = got
            asyncio.run(measure_decode(e, s.url, prompts[0], 8))
            asyncio.run(measure_prefill(e, s.url, long_prompt(99)))
            asyncio.run(measure_concurrent(e, s.url, prompts, args.clients, 1.0, 4, 0))
        ref = same[engines[0]]
        same_tokens = {e: {f"prompt{i}": f"{agreement(ref[i], got[i])}/{len(ref[i])}" for i in ref}
                       for e, got in same.items()}
        print(f"greedy tokens vs {engines[0]} (32 tokens, 2 prompts, leading tokens equal): "
              + ", ".join(f"{e} {' '.join(v.values())}" for e, v in same_tokens.items()), flush=True)
        time.sleep(1.0)
        for r in range(args.rounds):
            order = engines[r % len(engines):] + engines[:r % len(engines)]
            for e in order:
                s = servers[e]
                before = os.getloadavg()
                row = {"round": r}
                with cpu_meter(s, row, "decode"):
                    row.update(asyncio.run(measure_decode(e, s.url, prompts[r % len(prompts)], args.decode_tokens)))
                row["decode_tokens"] = row.pop("tokens")
                row["decode_ttft_ms"] = row.pop("ttft_ms")
                with cpu_meter(s, row, "prefill"):
                    row.update(asyncio.run(measure_prefill(e, s.url, long_prompt(r))))
                with cpu_meter(s, row, "conc"):
                    row.update(asyncio.run(measure_concurrent(e, s.url, prompts, args.clients, args.duration,
                                                              args.conc_max_tokens, r)))
                after = os.getloadavg()
                row["load_before"], row["load_after"] = list(before), list(after)
                load.append({"round": r, "engine": e, "before_1m": before[0], "after_1m": after[0]})
                per_round[e].append(row)
                print(f"  round {r + 1}/{args.rounds} {LABELS[e]:<23} TPOT {row['tpot_ms']:7.2f} ms  prefill "
                      f"{row['prefill_tok_s']:9.0f} tok/s  {args.clients} clients {row['conc_tok_s']:7.0f} tok/s "
                      f"(cores: server {row['conc_server_cores']:.2f} client {row['conc_client_cores']:.2f})  "
                      f"load {before[0]:.2f}->{after[0]:.2f}", flush=True)
                time.sleep(1.0)  # let the server finish the cancelled streams and its threads go idle
    finally:
        for s in servers.values():
            s.stop()
        if args.keep_logs:
            print(f"server logs: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    keys = [k for k, *_ in METRICS] + [f"{ph}_{who}_cores" for ph in ("decode", "prefill", "conc")
                                       for who in ("server", "client")]
    summary = {e: {k: summarize([row[k] for row in rows]) for k in keys} for e, rows in per_round.items()}
    ratios = {}
    if "llama.cpp" in summary:
        base = summary["llama.cpp"]
        for e in engines:
            if e == "llama.cpp":
                continue
            ratios[e] = {k: (summary[e][k]["median"] / base[k]["median"]
                             if summary[e][k]["median"] and base[k]["median"] else None) for k, *_ in METRICS}
    wall = time.perf_counter() - started

    print(f"\nllama.cpp vs moeserve, demo model, {args.threads} thread(s), {args.rounds} rounds, median (best round) "
          f"(load 1-min {min(x['before_1m'] for x in load):.2f}-{max(x['after_1m'] for x in load):.2f}, "
          f"{os.cpu_count()} cores)")
    head = f"{'engine':<28}" + "".join(f"{label + ' (' + unit + ')':>24}" for _, label, unit, _ in METRICS)
    print(head)
    print("-" * len(head))
    for e in engines:
        cells = []
        for k, _, _, higher in METRICS:
            m, d = summary[e][k], 2 if k == "tpot_ms" else 0
            cells.append(f"{fmt(m['median'], d)} ({fmt(m['max'] if higher else m['min'], d)})")
        print(f"{LABELS[e]:<28}" + "".join(f"{c:>24}" for c in cells))
    for e, rat in ratios.items():
        print(f"{'  ' + e + ' / llama.cpp':<28}" + "".join(f"{fmt(rat[k], 2) + 'x':>24}" for k, *_ in METRICS))
    if ratios:
        print("(ratio > 1 is worse for TPOT, < 1 is worse for the throughputs)")
    for e in engines:
        m = summary[e]
        print(f"  {LABELS[e]}: cores used, server/client: decode {fmt(m['decode_server_cores']['median'], 2)}/"
              f"{fmt(m['decode_client_cores']['median'], 2)}, {args.clients} clients "
              f"{fmt(m['conc_server_cores']['median'], 2)}/{fmt(m['conc_client_cores']['median'], 2)}")
    busiest = max((x["before_1m"] for x in load), default=0.0)
    if "llama.cpp" in engines and busiest + args.threads > (os.cpu_count() or 1) + 0.5:
        print(f"note: load average up to {busiest:.2f} on {os.cpu_count()} cores with {args.threads} thread(s) per "
              "server: llama.cpp's spinning threadpool slows down sharply when its threads cannot all run "
              "(docs/llamacpp.md); compare with --threads 1 or on a quieter machine")
    print(f"wall {wall:.0f} s")

    if args.json_out:
        out = {
            "bench": "bench_llamacpp", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
            "settings": {**vars(args), "gguf": gguf, "llama_server": binary, "prompts": "builtin:mixed (16)",
                         "ctx_per_slot": ctx_per_slot},
            "servers": {e: s.info for e, s in servers.items()}, "greedy_tokens_equal": same_tokens,
            "summary": summary, "ratios_moeserve_over_llamacpp": ratios, "rounds": per_round, "load": load,
            "wall_s": wall,
        }
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
