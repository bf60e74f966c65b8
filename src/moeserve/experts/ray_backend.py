"""RayBackend: a placement's expert functions as Ray Serve deployments (the backend for more than one machine).

The second `ExpertBackend` (experts/backend.py), next to the embedded process backend. Each function of
the placement is a Serve application of one deployment (`ray_config`: the plan's fields -> Serve's) whose
replicas load only their experts (`ray_replica.ExpertReplica`). Serve's own controller does what the
process backend writes by hand: replicas, keep-alive and scale to zero (its autoscaler), restarts of
dead replicas, and placement on nodes (resources); this backend only

- sends each call through the function's `DeploymentHandle` by value (numpy arrays; docs/scale-out.md
  says why handles and not direct actor calls), all calls of a layer in flight at once; a big call (a
  prefill) goes out in parts over the function's replicas (`call_parts`), which is also what lets Serve's
  autoscaler see a busy function: one engine sends one call per function at a time;
- reports a call that raised, timed out or came back malformed as failed (None): the shared failure
  policy, `collect_with_failover`, then retries it on another function holding its experts, or the
  dispatch computes it locally;
- pre-warms (SPS, `prewarm`) by sending a no-op call to a function scaled to zero: Serve's autoscaler
  starts a replica for the queued request; MoEless's straggler replicas (`add_function`) are new Serve
  applications;
- polls Serve's instance details in a background thread: replicas running per function (its "ready"),
  and each replica's `start_time_s`, which with the replica's own ready time gives the cold start.

Ray is an optional dependency (`pip install 'moeserve[ray]'`): it is imported when a backend starts.
With no Ray running, `start` starts a local one (no dashboard, no usage stats, the machine's CPUs and
memory) and `stop` shuts it down; with `address`, it joins that cluster and leaves it running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import psutil
import torch

from moeserve.errors import MoeServeError
from moeserve.experts.backend import RemoteCall
from moeserve.experts.ray_config import (
    DEPLOYMENT,
    SERVE_ENV,
    RaySettings,
    app_name,
    deployment_config,
    device_resource,
    fit_scale,
    replica_args,
)
from moeserve.experts.ray_replica import ExpertReplica
from moeserve.models.adapter import require_moe_layers
from moeserve.models.expert_ffn import ExpertLayout
from moeserve.plan.placement import ExpertFunction, ExpertPlacement

log = logging.getLogger("moeserve.serving")

STOPPED, STARTING, READY = "stopped", "starting", "ready"


def call_parts(num_tokens: int, running: int, min_tokens: int) -> list[tuple[int, int]]:
    """Token ranges [start, stop) of one layer call's parts: one part, or, for a call of at least
    2 x `min_tokens` tokens, max(2, running replicas) parts of at least `min_tokens` tokens each (at least
    two even with one replica: Serve's autoscaler then sees two requests in flight and adds one).
    min_tokens 0: never split."""
    if min_tokens <= 0 or num_tokens < 2 * min_tokens:
        return [(0, num_tokens)]
    parts = min(max(2, running), num_tokens // min_tokens)
    bounds = np.linspace(0, num_tokens, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def require_ray():
    """Import ray and ray.serve, or say how to install them (one line)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MoeServeError("--backend ray needs Ray Serve: pip install 'moeserve[ray]'") from None
    return ray, serve


WARM_RESEND_S = 30.0  # a function still without a replica this long after its wake-up call gets another


@dataclass
class _Function:
    spec: ExpertFunction
    handle: object = None  # ray.serve DeploymentHandle
    running: int = 0  # replicas RUNNING at the last poll
    replicas: list[dict] = field(default_factory=list)  # Serve's replica details at the last poll
    in_flight: int = 0  # pairs sent and not yet collected
    last_error: str = ""
    serve_status: tuple[str, str] = ("", "")  # the application's status and message in Serve's details
    warm_sent_at: float = -1e9  # monotonic time of the last no-op call sent to start a replica
    failed_since_start: bool = False
    counters: dict = field(default_factory=lambda: dict.fromkeys(
        ("calls", "split_parts", "pairs", "tokens", "failures", "restarts", "cold_starts", "scaled_to_zero"), 0) | dict.fromkeys(
        ("latency_s", "compute_s", "cold_start_s", "last_cold_start_s"), 0.0))


class RayBackend:
    """The expert functions of one placement on Ray Serve (see the module docstring)."""

    def __init__(self, model_dir: str, placement: ExpertPlacement, layouts: dict[int, ExpertLayout],
                 hidden_size: int, dtype: torch.dtype | str = torch.float32, *, address: str | None = None,
                 settings: RaySettings | None = None, fit_resources: bool | None = None,
                 call_timeout_s: float = 10.0, start_timeout_s: float = 180.0, poll_interval_s: float = 0.5,
                 wait_for_cold_start: bool = True):
        self.model_dir = str(model_dir)
        self.placement, self.layouts, self.hidden_size = placement, layouts, hidden_size
        self.dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        self.address, self.settings, self.fit_resources = address, settings or RaySettings(), fit_resources
        self.call_timeout_s, self.start_timeout_s, self.poll_interval_s = call_timeout_s, start_timeout_s, poll_interval_s
        # False: a call to a function without a running replica is not sent (its pairs are computed locally)
        # and one no-op call asks Serve for a replica; True: the call waits up to start_timeout_s for it
        self.wait_for_cold_start = wait_for_cold_start
        self.functions: dict[str, _Function] = {}
        for spec in placement.functions:
            self._register(spec)
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._poller: threading.Thread | None = None
        self._call_listeners: list = []
        self._ready_at: dict[int, float] = {}  # replica pid -> its constructor's end (wall clock)
        self._costed: set[int] = set()  # replica pids whose cold start is counted
        self._owns_ray = False
        self._ray = self._serve = None

    @classmethod
    def from_model(cls, model, model_dir: str, placement: ExpertPlacement, **kwargs) -> RayBackend:
        layers = require_moe_layers(model)
        placement.validate([la.index for la in layers], layers[0].num_experts)
        kwargs.setdefault("dtype", layers[0].experts.down_proj.dtype)
        return cls(model_dir, placement, {la.index: la.layout for la in layers}, layers[0].hidden_size, **kwargs)

    def _register(self, spec: ExpertFunction) -> _Function:
        if spec.layer not in self.layouts:
            raise MoeServeError(f"function {spec.id}: layer {spec.layer} is not a MoE layer of the model")
        if spec.id in self.functions:
            raise MoeServeError(f"duplicate expert function id {spec.id}")
        fn = self.functions[spec.id] = _Function(spec)
        return fn

    # ------------------------------------------------------------------------------------ lifecycle
    def _connect(self) -> None:
        for key, value in SERVE_ENV.items():  # read when ray.serve is first imported (the handles' router)
            os.environ.setdefault(key, value)
        ray, serve = self._ray, self._serve = require_ray()
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if self.address:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            else:
                resources = {r: 1000.0 for r in {device_resource(f) for f in self.functions} if r}
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False, resources=resources,
                         _memory=int(psutil.virtual_memory().available * 0.7))
                log.info("local Ray started: %d CPUs", os.cpu_count())
            self._owns_ray = True
        fit = self.fit_resources if self.fit_resources is not None else not self.address
        if fit:
            free = ray.available_resources()  # what this Ray has left (another engine may hold the rest)
            scale = fit_scale([f.spec for f in self.functions.values()], self.settings, free.get("CPU", 0.1),
                              free.get("memory", 0.0) or psutil.virtual_memory().available)
            if scale < self.settings.resource_scale:
                log.info("the plan's functions ask for more than this Ray has: CPU and memory requests x %.3f", scale)
                self.settings = replace(self.settings, resource_scale=scale)
        serve.start(proxy_location="Disabled")

    def _app(self, function_id: str) -> str:
        return app_name(function_id, self.settings.app_prefix)

    def _application(self, spec: ExpertFunction):
        args = replica_args(self.model_dir, spec, self.layouts[spec.layer].to_dict(), self.hidden_size,
                            self.dtype_name, self.settings.num_threads)
        options = deployment_config(spec, self.settings)
        with warnings.catch_warnings():  # the deprecated metrics_interval_s: see ray_config
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._serve.deployment(ExpertReplica).options(**options).bind(args)

    def _deploy(self, specs: list[ExpertFunction], wait: bool) -> None:
        targets = [self._serve.RunTarget(target=self._application(s), name=self._app(s.id), route_prefix=None)
                   for s in specs]
        if not targets:
            return
        self._serve.run_many(targets, wait_for_applications_running=False)
        for s in specs:
            self.functions[s.id].handle = self._serve.get_deployment_handle(DEPLOYMENT, self._app(s.id))
        if wait:
            self._await(lambda: all(self.functions[s.id].running > 0 for s in specs),
                        f"expert functions {[s.id for s in specs]} did not start")

    def start(self, wait: bool = True) -> RayBackend:
        """Connect (or start a local Ray), deploy every function; with `wait`, until each has a replica."""
        self._closing.clear()
        self._connect()
        log.info("deploying %d expert functions on Ray Serve", len(self.functions))
        self._deploy([f.spec for f in self.functions.values()], wait=False)
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="moeserve-ray-poller", daemon=True)
            self._poller.start()
        if wait:
            self._await(lambda: all(f.running > 0 for f in self.functions.values()), "expert functions did not start")
        return self

    def _await(self, condition, message: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not condition():
            failed = {fid: fn.serve_status[1] for fid, fn in self.functions.items()
                      if fn.serve_status[0] == "DEPLOY_FAILED"}
            if failed:
                fid, why = next(iter(failed.items()))
                raise MoeServeError(f"expert function {fid} failed to deploy on Ray Serve: {' '.join(why.split())[:200]}")
            if time.monotonic() > deadline:
                waiting = [(fid, fn.serve_status[1]) for fid, fn in self.functions.items()
                           if fn.running == 0 and fn.serve_status[1]]
                why = f" ({waiting[0][0]}: {' '.join(waiting[0][1].split())})" if waiting else ""
                raise MoeServeError(f"{message} within {self.start_timeout_s:.0f} s on Ray Serve{why}")
            self.poll()
            time.sleep(0.1)

    def stop(self) -> None:
        """Delete every function's application; shut down the Ray this backend started. Idempotent."""
        if self._serve is None:
            return
        self._closing.set()
        poller, self._poller = self._poller, None
        if poller is not None and poller is not threading.current_thread():
            poller.join(timeout=5)
        serve, ray = self._serve, self._ray
        try:
            if self._owns_ray:
                serve.shutdown()
            else:
                for fid in list(self.functions):
                    serve.delete(self._app(fid), _blocking=True)
        finally:
            if self._owns_ray:
                ray.shutdown()
            self._serve = self._ray = None
            self._owns_ray = False

    def __enter__(self) -> RayBackend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_function(self, spec: ExpertFunction, wait: bool = False) -> None:
        """A new function (e.g. a MoEless straggler replica): a new Serve application."""
        with self._lock:
            self._register(spec)
        self._deploy([spec], wait)

    def remove_function(self, function_id: str) -> None:
        with self._lock:
            self.functions.pop(function_id)
        self._serve.delete(self._app(function_id), _blocking=False)

    def prewarm(self, function_ids: list[str], wait: bool = False) -> None:
        """Functions scaled to zero get a no-op call: Serve's autoscaler starts a replica for it."""
        sent = []
        for fid in function_ids:
            fn = self.functions[fid]
            if fn.running == 0 and fn.handle is not None:
                fn.warm_sent_at = time.monotonic()
                sent.append(fn.handle.options(method_name="warm").remote())
        if wait:
            for response in sent:
                response.result(timeout_s=self.start_timeout_s)
            self._await(lambda: all(self.functions[f].running > 0 for f in function_ids), "pre-warming timed out")

    def _wake(self, fn: _Function) -> None:
        """One no-op call, at most every WARM_RESEND_S, so that Serve's autoscaler starts a replica (the
        caller holds the lock)."""
        now = time.monotonic()
        if fn.handle is not None and now - fn.warm_sent_at > WARM_RESEND_S:
            fn.warm_sent_at = now
            fn.handle.options(method_name="warm").remote()

    # ------------------------------------------------------------------------------ Serve's view
    def poll(self) -> None:
        """Read Serve's instance details once: running replicas per function, new replicas' cold starts."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        apps = details.get("applications", {})
        with self._lock:
            for fid, fn in self.functions.items():
                app = apps.get(self._app(fid), {})
                deployment = app.get("deployments", {}).get(DEPLOYMENT, {})
                # the deployment's message says why replicas wait (e.g. resources no node offers)
                fn.serve_status = (str(app.get("status", "")),
                                   str(app.get("message") or deployment.get("message") or "")[:400])
                replicas = deployment.get("replicas", [])
                running = sum(r.get("state") == "RUNNING" for r in replicas)
                if fn.running > 0 and running == 0 and not fn.failed_since_start:
                    fn.counters["scaled_to_zero"] += 1
                    log.info("function %s scaled to zero by Serve", fid)
                fn.running, fn.replicas = running, replicas
                if running and fn.failed_since_start:  # Serve replaced the failed replica
                    fn.counters["restarts"] += 1
                    fn.failed_since_start = False
                for r in replicas:
                    if r.get("state") == "RUNNING":
                        self._cost_cold_start(fn, r)

    def _cost_cold_start(self, fn: _Function, replica: dict) -> None:
        """Serve's replica start time -> the replica's own ready time: one cold start of `fn`."""
        pid = replica.get("pid")
        if pid is None or pid in self._costed or pid not in self._ready_at:
            return
        self._costed.add(pid)
        cold = max(0.0, self._ready_at[pid] - float(replica["start_time_s"]))
        c = fn.counters
        c["cold_starts"] += 1
        c["cold_start_s"] += cold
        c["last_cold_start_s"] = cold
        log.info("function %s: replica pid %d ready, cold start %.2f s", fn.spec.id, pid, cold)

    def _poll_loop(self) -> None:
        while not self._closing.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception:  # Serve's controller restarting, a network blip: poll again
                log.debug("polling Ray Serve failed", exc_info=True)

    def replicas(self, function_id: str) -> list[dict]:
        """Serve's details of the function's replicas at the last poll (state, pid, node_id, actor_name)."""
        with self._lock:
            return list(self.functions[function_id].replicas)

    # ---------------------------------------------------------------------------------------- calls
    def _holders(self, layer: int, expert: int, allowed: frozenset[str] | None) -> list[_Function]:
        return [fn for fid, fn in self.functions.items() if fn.spec.layer == layer and expert in fn.spec.experts
                and (allowed is None or fid in allowed)]

    def assign(self, layer: int, expert_loads: dict[int, int], allowed: frozenset[str] | None = None,
               ) -> tuple[dict[str, list[int]], list[int]]:
        """Per expert the least busy holder with a running replica; with none running, any holder (the
        call then waits for Serve to start one: scale from zero). Heaviest experts first."""
        with self._lock:
            load = {fid: fn.in_flight for fid, fn in self.functions.items()}
            chosen: dict[str, list[int]] = {}
            unplaced = []
            for e in sorted(expert_loads, key=lambda e: -expert_loads[e]):
                holders = self._holders(layer, e, allowed)
                # none running: a function Serve scaled to zero (no replica listed) is called, and Serve
                # starts it; one with replicas starting (replacing a failed one, or a cold start already
                # under way) or a failed one is not: its pairs are computed locally meanwhile
                candidates = [fn for fn in holders if fn.running > 0] or [
                    fn for fn in holders if not fn.replicas and not fn.failed_since_start]
                if not candidates:
                    unplaced.append(e)
                    continue
                fid = min(candidates, key=lambda f: (load[f.spec.id], f.counters["calls"])).spec.id
                load[fid] += expert_loads[e]
                chosen.setdefault(fid, []).append(e)
            return chosen, unplaced

    def call(self, function_id: str, x: torch.Tensor, token_rows: torch.Tensor, pair_rows: np.ndarray,
             pair_experts: np.ndarray, pair_weights: np.ndarray) -> RemoteCall:
        """Send one call through the function's handle (by value: numpy arrays); returns at once."""
        rc = RemoteCall(function_id, self.functions[function_id].spec.layer, x, token_rows, pair_rows,
                        pair_experts, pair_weights)
        with self._lock:
            fn = self.functions.get(function_id)
            if fn is None or fn.handle is None or self._closing.is_set():
                rc.failed = True
                return rc
            cold = fn.running == 0
            if cold and not self.wait_for_cold_start:
                self._wake(fn)
                rc.failed = True
                return rc
            fn.in_flight += len(pair_rows)
            parts = call_parts(len(token_rows), fn.running, self.settings.split_min_tokens)
        xs = x.index_select(0, token_rows).float().numpy()
        rows = pair_rows.astype(np.int32, copy=False)
        experts, weights = pair_experts.astype(np.int32, copy=False), pair_weights.astype(np.float32, copy=False)
        rc.sent_at = time.perf_counter()
        responses = []
        try:
            for start, stop in parts:
                mine = (rows >= start) & (rows < stop)
                responses.append(fn.handle.remote(xs[start:stop], rows[mine] - start, experts[mine], weights[mine]))
        except Exception as exc:  # the handle refused (its application was deleted)
            for response in responses:
                response.cancel()
            self._failed(fn, rc, f"send failed: {exc}")
            return rc
        rc.handle = (responses, cold)
        return rc

    def _failed(self, fn: _Function, rc: RemoteCall, reason: str) -> None:
        log.warning("function %s: call failed (%s)", fn.spec.id, reason)
        rc.failed = True
        with self._lock:
            fn.in_flight = max(0, fn.in_flight - len(rc.pair_rows))
            fn.counters["failures"] += 1
            fn.last_error, fn.failed_since_start = reason, True

    def collect(self, calls: list[RemoteCall]) -> list[torch.Tensor | None]:
        """Wait for the calls (one deadline; a call sent to a function with no running replica waits up to
        `start_timeout_s`): per call y [U, H], or None when it raised, timed out or came back malformed."""
        results: list[torch.Tensor | None] = [None] * len(calls)
        now = time.perf_counter()
        warm_deadline, cold_deadline = now + self.call_timeout_s, now + self.start_timeout_s
        for i, rc in enumerate(calls):
            if rc.failed or rc.handle is None:
                rc.failed = True
                continue
            responses, cold = rc.handle
            fn = self.functions.get(rc.function_id)
            deadline = cold_deadline if cold else warm_deadline
            try:
                answers = [self._result(response, fn, cold, deadline) for response in responses]
            except Exception as exc:  # a replica died (actor error), timed out, or the app is gone
                for response in responses:
                    try:
                        response.cancel()
                    except Exception:
                        pass
                if fn is not None:
                    self._failed(fn, rc, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                else:
                    rc.failed = True
                continue
            n = int(rc.token_rows.numel())
            ys = [a[0] for a in answers]
            if not all(isinstance(y, np.ndarray) for y in ys) or sum(len(y) for y in ys) != n:
                self._failed(fn, rc, "malformed result")
                continue
            y = np.concatenate(ys) if len(ys) > 1 else np.array(ys[0])  # writable: the dispatch adds into it
            if y.shape != (n, self.hidden_size) or not np.isfinite(y).all():
                self._failed(fn, rc, "malformed result")
                continue
            results[i] = torch.from_numpy(y)
            rc.compute_s = float(sum(a[1] for a in answers))  # billed per replica: the parts' sum
            with self._lock:
                for _, _, pid, ready_at in answers:
                    self._ready_at.setdefault(int(pid), float(ready_at))
                c = fn.counters
                fn.in_flight = max(0, fn.in_flight - len(rc.pair_rows))
                c["calls"] += 1
                c["split_parts"] += len(answers) if len(answers) > 1 else 0
                c["pairs"] += len(rc.pair_rows)
                c["tokens"] += n
                c["latency_s"] += time.perf_counter() - rc.sent_at
                c["compute_s"] += rc.compute_s
            for listener in self._call_listeners:
                listener(rc.function_id, rc.compute_s)
        return results

    def _result(self, response, fn: _Function | None, cold: bool, deadline: float):
        """Wait for one response until `deadline`; a warm call whose function lost every running replica
        meanwhile (its node went away: Serve would hold the call until a new replica starts) fails now."""
        while True:
            left = deadline - time.perf_counter()
            try:
                return response.result(timeout_s=max(0.001, min(left, 0.25)))
            except TimeoutError:
                if left <= 0.25:
                    raise
                if not cold and fn is not None and fn.running == 0:
                    raise RuntimeError("no running replica left (node or replica gone)") from None

    def ready_replicas(self, layer: int, experts: set[int], exclude: str,
                       allowed: frozenset[str] | None = None) -> list[str]:
        """Functions of `layer` with a running replica holding all of `experts`, but `exclude`, least busy first."""
        with self._lock:
            found = [fid for fid, fn in self.functions.items()
                     if fid != exclude and fn.running > 0 and fn.spec.layer == layer
                     and experts <= set(fn.spec.experts) and (allowed is None or fid in allowed)]
            return sorted(found, key=lambda f: self.functions[f].in_flight)

    def specs(self) -> dict[str, ExpertFunction]:
        with self._lock:
            return {fid: fn.spec for fid, fn in self.functions.items()}

    def add_call_listener(self, listener) -> None:
        """Call `listener(function_id, compute_s)` after every call answered (e.g. to bill it)."""
        self._call_listeners.append(listener)

    # -------------------------------------------------------------------------------------- metrics
    def pids(self) -> dict[str, int]:
        """A running replica's pid per function (the first one Serve lists)."""
        with self._lock:
            return {fid: r["pid"] for fid, fn in self.functions.items() for r in fn.replicas[:1]
                    if r.get("state") == "RUNNING" and r.get("pid")}

    def metrics(self) -> dict:
        """The process backend's keys (`ProcessBackend.metrics`), plus `replicas` (Serve's running replicas)."""
        with self._lock:
            snapshot = [(fid, fn.spec, fn.running, list(fn.replicas), dict(fn.counters))
                        for fid, fn in self.functions.items()]
        per_fn = {}
        for fid, spec, running, replicas, counters in snapshot:
            pids = [r["pid"] for r in replicas if r.get("state") == "RUNNING" and r.get("pid")]
            per_fn[fid] = {
                "layer": spec.layer, "experts": list(spec.experts),
                "state": READY if running else (STARTING if replicas else STOPPED),
                "pid": pids[0] if pids else None, "replicas": running,
                "rss_bytes": sum(_rss(p) for p in pids), "weights_bytes": 0, **counters,
            }
        totals = {k: sum(f[k] for f in per_fn.values())
                  for k in ("calls", "pairs", "failures", "restarts", "cold_starts", "latency_s", "compute_s")}
        replicas_alive: dict[str, int] = {}
        for f in per_fn.values():
            for e in f["experts"]:
                key = f"{f['layer']}:{e}"
                replicas_alive[key] = replicas_alive.get(key, 0) + (f["state"] == READY)
        return {"functions": per_fn, **totals, "functions_alive": sum(f["state"] == READY for f in per_fn.values()),
                "replicas_alive": replicas_alive}


def _rss(pid: int) -> int:
    """Resident memory of a replica on this machine (0 for one on another node)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
