"""A burst from the Azure code trace against a Ray-backed server: Serve's autoscaler scales the busy expert
functions up, and back down once the burst is over (issue 12's "a burst scales a hot function up and back
down"; docs/scale-out.md).

    python scripts/ray_burst.py [--rate 3] [--burst 60] [--idle 90] [--keep-alive 20] [--target 1] [--out F]

Plan: the demo with experts 16-31 of every MoE layer in one function per layer (keep-alive --keep-alive),
experts 0-15 local. `moeserve serve demo --plan P --backend ray` (a local Ray it starts and stops), then
`moeserve bench --workload azure-code --rate R --duration BURST`, then --idle seconds without requests;
/metrics is read every second throughout (`moeserve_function_replicas`: Serve's running replicas).
Prints the timeline (replicas per function every 5 s) and, per function, when it first had more than one
replica and when it was back to one (or zero).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from moeserve.models.geometry import inspect_model
from moeserve.models.loading import DEMO_MODEL_DIR
from moeserve.plan.ids import remoe_function_id
from moeserve.plan.placement import ExpertFunction
from moeserve.plan.schema import MainPlan, Plan

REPLICAS = re.compile(r'^moeserve_function_replicas\{function="([^"]+)",layer="\d+"\} ([0-9.]+)$', re.M)
MOESERVE = [str(Path(sys.executable).with_name("moeserve"))]  # the console script beside this python


def half_remote_plan(keep_alive_s: float) -> Plan:
    geometry = inspect_model(str(DEMO_MODEL_DIR))
    layers, n = list(geometry.moe_layers), geometry.num_experts
    functions = [ExpertFunction(remoe_function_id(la, 0), la, tuple(range(n // 2, n)), keep_alive_s=keep_alive_s)
                 for la in layers]
    return Plan(strategy="manual", model="demo", geometry=geometry.to_dict(),
                main=MainPlan("cpu", {la: list(range(n // 2)) for la in layers}), functions=functions)


def sample(url: str, stop: threading.Event, t0: float, out: list) -> None:
    while not stop.wait(1.0):
        try:
            text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        except OSError:
            continue
        out.append((round(time.monotonic() - t0, 1), {f: float(v) for f, v in REPLICAS.findall(text)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=3.0)
    parser.add_argument("--burst", type=float, default=60.0)
    parser.add_argument("--idle", type=float, default=90.0)
    parser.add_argument("--keep-alive", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--target", type=float, default=1.0, help="serve --ray-target (busy call-seconds per "
                        "second per replica the autoscaler aims at)")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="moeserve-burst-"))
    plan_path = half_remote_plan(args.keep_alive).save(work / "plan.yaml")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen([*MOESERVE, "serve", "demo", "--plan", str(plan_path), "--backend", "ray", "--port", "0",
                               "--ray-target", str(args.target), "--ray-max-replicas", str(args.max_replicas), "--json"], stdout=subprocess.PIPE, stderr=open(work / "server.log", "w"), text=True,
                              env=env)
    try:
        url = json.loads(server.stdout.readline())["url"]
        t0, timeline, stop = time.monotonic(), [], threading.Event()
        print(f"server {url} up; load average {os.getloadavg()[0]:.1f}", flush=True)
        sampler = threading.Thread(target=sample, args=(url, stop, t0, timeline), daemon=True)
        sampler.start()
        time.sleep(10)  # the starting replicas settle: the timeline shows the idle baseline first
        burst_at = time.monotonic() - t0
        bench = subprocess.run([*MOESERVE, "bench", "--url", url, "--workload", "azure-code", "--rate", str(args.rate),
                                "--duration", str(args.burst), "--max-tokens", str(args.max_tokens), "--json"],
                               capture_output=True, text=True, env=env)
        burst_end = time.monotonic() - t0
        print(f"burst {burst_at:.0f}-{burst_end:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
        time.sleep(args.idle)
        stop.set()
        sampler.join()
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=120)
    functions = sorted({f for _, row in timeline for f in row})
    print(f"{'t s':>6} " + " ".join(f"{f:>6}" for f in functions))
    for t, row in timeline[::5]:
        print(f"{t:6.0f} " + " ".join(f"{row.get(f, 0):6.0f}" for f in functions))
    summary = {}
    for f in functions:
        up = next((t for t, row in timeline if row.get(f, 0) > 1), None)
        down = next((t for t, row in timeline if up is not None and t > up and row.get(f, 0) <= 1), None)
        summary[f] = {"max_replicas": max(row.get(f, 0) for _, row in timeline), "above_one_at_s": up,
                      "back_to_one_at_s": down}
        print(f"{f}: max {summary[f]['max_replicas']:.0f} replicas; >1 from {up} s; back to <=1 at {down} s")
    result = {"rate": args.rate, "target": args.target, "max_replicas": args.max_replicas, "burst_s": [burst_at, burst_end], "idle_s": args.idle, "keep_alive_s": args.keep_alive,
              "functions": summary, "timeline": timeline, "server_rc": rc, "bench_rc": bench.returncode,
              "bench": json.loads(bench.stdout) if bench.returncode == 0 and bench.stdout.strip() else bench.stderr[-2000:]}
    print(f"server exit {rc}; bench exit {bench.returncode}; logs in {work}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
