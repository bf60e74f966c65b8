"""One replica of an expert function on Ray Serve: it loads only its experts and computes calls.

The replica reads its experts from the checkpoint's safetensors (`models.checkpoint.read_experts`,
memory mapped; nothing else of the model, no pickled weights) and answers calls whose hidden states
come as numpy arrays (see docs/scale-out.md, "Transport"):

    (x [U, H] float32, pair_rows [P] int32, pair_experts [P] int32 sorted, pair_weights [P] float32)
      -> (y [U, H] float32, compute_s, pid, ready_at)

`ready_at` (wall clock, end of the constructor) and `pid` let the backend pair each replica with
Serve's own record of it (its `start_time_s`) to measure cold starts. `build_app(args)` is the import
path a Serve config names (`moeserve export ray-serve`); the backend deploys the same class itself.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil
import torch

from moeserve.experts.ray_config import DEPLOYMENT
from moeserve.experts.ray_policy import CALLS, CONCURRENCY
from moeserve.models.checkpoint import read_experts
from moeserve.models.expert_ffn import ExpertLayout, activation, weighted_expert_sum


class ExpertReplica:
    """The Serve deployment class; `args` as `ray_config.replica_args` builds them."""

    def __init__(self, args: dict):
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(args.get("num_threads", 1))))
        self.layout = ExpertLayout(**args["layout"])
        self.dtype = getattr(torch, args.get("dtype", "float32"))
        self.hidden_size = int(args["hidden_size"])
        self.weights = read_experts(args["model_dir"], int(args["layer"]), list(args["experts"]), self.layout,
                                    self.dtype)
        self.act = None if self.layout.activation == "gptoss_swiglu" else activation(self.layout.activation)
        self.load_s = time.perf_counter() - t0
        self.ready_at = time.time()
        self.pid = os.getpid()
        self.fault_mode = ""
        self._lock = threading.Lock()  # Serve may run calls on several threads at once
        self._busy_s, self._calls = 0.0, 0  # call seconds and calls since the last autoscaling record
        self._recorded_at = time.perf_counter()

    def _count(self, seconds: float) -> None:
        with self._lock:
            self._busy_s += seconds
            self._calls += 1

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook, called every recording interval: call seconds per wall second and calls since the
        last record (what `ray_policy.expert_function_policy` scales on)."""
        now = time.perf_counter()
        with self._lock:
            busy, calls, since = self._busy_s, self._calls, now - self._recorded_at
            self._busy_s, self._calls, self._recorded_at = 0.0, 0, now
        return {CONCURRENCY: busy / max(since, 1e-6), CALLS: float(calls)}

    def __call__(self, x: np.ndarray, pair_rows: np.ndarray, pair_experts: np.ndarray, pair_weights: np.ndarray
                 ) -> tuple[np.ndarray, float, int, float]:
        t0 = time.perf_counter()
        if self.fault_mode == "exit":  # dies in the middle of this call
            os._exit(3)
        if self.fault_mode == "hang":
            time.sleep(3600)
        xt = torch.from_numpy(np.array(x, dtype=np.float32)).to(self.dtype)  # the arriving buffer is read-only
        y = weighted_expert_sum(xt, torch.from_numpy(pair_rows.astype(np.int64)), pair_experts,
                                torch.from_numpy(np.asarray(pair_weights, dtype=np.float32)).to(self.dtype),
                                self.weights, self.layout, self.act)
        compute_s = time.perf_counter() - t0
        self._count(compute_s)
        return y.float().numpy(), compute_s, self.pid, self.ready_at

    def warm(self) -> tuple[int, float]:
        """A no-op call: sent to a function scaled to zero, it makes Serve start a replica (pre-warming); it
        counts as a call, so the replica is kept for its keep-alive."""
        self._count(0.0)
        return self.pid, self.ready_at

    def fault(self, mode: str) -> None:
        """Test hook (as the process function's FAULT): "exit" or "hang" breaks this replica's next calls."""
        self.fault_mode = mode

    def info(self) -> dict:
        memory = psutil.Process().memory_full_info()
        return {"pid": self.pid, "rss_bytes": memory.rss, "uss_bytes": memory.uss, "load_s": self.load_s,
                "weights_bytes": sum(w.nbytes() for w in self.weights.values()), "ready_at": self.ready_at}


def build_app(args: dict):
    """The Serve application of one expert function (the `import_path` of an exported Serve config)."""
    from ray import serve

    return serve.deployment(ExpertReplica, name=DEPLOYMENT).bind(args)
