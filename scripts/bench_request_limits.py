"""A huge request against a real `moeserve serve`: the server's RSS and /health latency while it arrives.

    python scripts/bench_request_limits.py [--mb 64] [--src DIR] [--timeout 120]

Starts `moeserve serve demo --all-local` (from --src, a source tree's src/ folder: compare two versions
side by side), samples the server's resident memory and the latency of GET /health every 50 ms while one
client posts a completion whose prompt is --mb megabytes, and prints one JSON line: the response status
and time, the peak RSS above the idle server, and /health p50 / max latency before and during the request.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import psutil


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--src", default=None, help="src/ of the moeserve to run (default: the installed one)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args, _ = parser.parse_known_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.src:
        env["PYTHONPATH"] = args.src
    entry = "import moeserve.cli.serve; from moeserve.cli.app import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", entry, "serve", "demo", "--all-local", "--port", "0", "--json",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = json.loads(proc.stdout.readline())["url"]
        server = psutil.Process(proc.pid)
        idle_rss = server.memory_info().rss
        samples: list[tuple[float, float, int]] = []  # (time, /health seconds or -1, rss)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = httpx.get(f"{url}/health", timeout=args.timeout).status_code == 200
                    latency = time.perf_counter() - t0 if ok else -1.0
                except httpx.HTTPError:
                    latency = -1.0
                samples.append((t0, latency, server.memory_info().rss))
                time.sleep(0.05)

        rss_peak = [idle_rss]

        def watch_rss():
            while not stop.is_set():
                rss_peak[0] = max(rss_peak[0], server.memory_info().rss)
                time.sleep(0.05)

        body = json.dumps({"prompt": "x" * (args.mb << 20), "max_tokens": 1}).encode()
        threads = [threading.Thread(target=sample), threading.Thread(target=watch_rss)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        started = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                           timeout=args.timeout)
            status = r.status_code
        except httpx.HTTPError as exc:
            status = f"{type(exc).__name__}"
        answered = time.perf_counter() - started
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        before = sorted(s for t, s, _ in samples if 0 <= s and t + s < started)
        during = [s for t, s, _ in samples if t <= started + answered and (s < 0 or t + s >= started)]
        print(json.dumps({
            "src": args.src or "installed", "mb": args.mb, "status": status, "answered_s": round(answered, 3),
            "idle_rss_mb": round(idle_rss / 2**20, 1), "peak_rss_above_idle_mb": round((rss_peak[0] - idle_rss) / 2**20, 1),
            "health_p50_before_ms": round(1000 * before[len(before) // 2], 1) if before else None,
            "health_max_during_ms": round(1000 * max(during), 1) if during and min(during) >= 0 else None,
            "health_failed_during": sum(1 for s in during if s < 0), "health_probes_during": len(during),
            "load_avg": os.getloadavg(),
        }))
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
