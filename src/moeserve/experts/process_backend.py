"""ProcessBackend: expert functions as OS processes on this machine, kept warm, scaled to zero, repaired.

The embedded `ExpertBackend` (experts/backend.py):

- start/stop per the placement; a function idle for its `keep_alive_s` is stopped (scale to zero) and
  started again on demand, with its cold start (spawn -> ready) measured;
- replicas: each expert goes to the ready replica with the least work in flight (ties: fewest calls);
- failures: a function that dies (broken pipe), hangs (no answer within `call_timeout_s`) or answers
  garbage (wrong shape, non-finite values) is killed, counted and restarted; the call comes back None
  (the dispatch's failure policy then retries on a replica or computes locally: backend.py);
- cleanup: `stop()` ends every process and unlinks every shared-memory segment; pools still running at
  interpreter exit are stopped by an atexit hook, and on SIGTERM unless the application installed its
  own SIGTERM handler first (its shutdown runs instead; atexit stays the safety net).

One dispatcher thread drives the calls (`call` then `collect`); a reaper thread only stops idle
functions and notices dead ones. Both take the backend's lock, which is never held while waiting: a
call waiting for a cold start releases it between polls, so `/metrics` and pre-warming never wait on a
starting function.
"""

from __future__ import annotations

import atexit
import logging
import select
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from moeserve.defaults import FUNCTION_IDLE_SPIN_S, FUNCTION_SPIN_S, KEEP_ALIVE_S
from moeserve.errors import MoeServeError
from moeserve.experts.backend import RemoteCall
from moeserve.experts.process_function import FunctionConfig, FunctionError, FunctionProcess, LayerInput
from moeserve.models.adapter import require_moe_layers
from moeserve.models.expert_ffn import ExpertLayout
from moeserve.plan.placement import ExpertFunction, ExpertPlacement
from moeserve.units import mib

log = logging.getLogger("moeserve.serving")

STOPPED, STARTING, READY = "stopped", "starting", "ready"


@dataclass
class FunctionCounters:
    """Per-function counters, kept across restarts of its process."""

    calls: int = 0
    pairs: int = 0
    tokens: int = 0
    latency_s: float = 0.0  # send -> result received, summed
    compute_s: float = 0.0  # as reported by the function, summed
    failures: int = 0
    restarts: int = 0
    cold_starts: int = 0
    cold_start_s: float = 0.0  # summed
    last_cold_start_s: float = 0.0
    scaled_to_zero: int = 0


@dataclass
class _Function:
    spec: ExpertFunction
    config: FunctionConfig
    proc: FunctionProcess | None = None
    state: str = STOPPED
    last_used: float = 0.0
    in_flight: int = 0  # pairs sent and not yet collected
    last_error: str = ""
    counters: FunctionCounters = field(default_factory=FunctionCounters)


_LIVE_BACKENDS: weakref.WeakSet = weakref.WeakSet()
_cleanup_installed = False


def _stop_all_backends() -> None:
    for pool in list(_LIVE_BACKENDS):
        pool.stop()


def _install_cleanup() -> None:
    """Stop every live pool at exit and on SIGTERM (then defer to the previous SIGTERM handler)."""
    global _cleanup_installed
    if _cleanup_installed:
        return
    _cleanup_installed = True
    atexit.register(_stop_all_backends)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if callable(previous):  # the application's own shutdown (drain, then pool.stop()) comes first
            previous(signum, frame)
            return
        _stop_all_backends()
        if previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


class ProcessBackend:
    """The expert functions of one placement as local processes (see the module docstring)."""

    def __init__(
        self,
        model_dir: str,
        placement: ExpertPlacement,
        layouts: dict[int, ExpertLayout],
        hidden_size: int,
        dtype: torch.dtype | str = torch.float32,
        *,
        num_threads: int = 1,
        call_timeout_s: float = 5.0,
        start_timeout_s: float = 120.0,
        wait_for_start: bool = True,
        reap_interval_s: float | None = None,
        start_delay_s: float = 0.0,
        spin_s: float = FUNCTION_SPIN_S,
        idle_spin_s: float = FUNCTION_IDLE_SPIN_S,
    ):
        dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        self.model_dir = str(model_dir)
        self.placement = placement
        self.hidden_size = hidden_size
        self.dtype = getattr(torch, dtype_name)
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self.wait_for_start = wait_for_start
        self.layouts, self.num_threads, self.start_delay_s = layouts, num_threads, start_delay_s
        self.spin_s, self.idle_spin_s = spin_s, idle_spin_s
        self._inputs: dict[int, LayerInput] = {}  # per MoE layer: its x in shared memory, for all its functions
        self.functions: dict[str, _Function] = {}
        self._holders: dict[tuple[int, int], list[str]] = {}
        for spec in placement.functions:
            self._register(spec)
        keep_alive = min((s.keep_alive_s for s in placement.functions), default=KEEP_ALIVE_S)
        self.reap_interval_s = reap_interval_s or max(0.05, min(5.0, keep_alive / 4))
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # waits for a start release the lock
        self._call_listeners: list = []
        self._closing = threading.Event()
        self._reaper: threading.Thread | None = None

    @classmethod
    def from_model(cls, model, model_dir: str, placement: ExpertPlacement, **kwargs) -> ProcessBackend:
        """A pool for `model` (layouts, hidden size and dtype read from its MoE layers)."""

        layers = require_moe_layers(model)
        placement.validate([la.index for la in layers], layers[0].num_experts)
        kwargs.setdefault("dtype", layers[0].experts.down_proj.dtype)
        return cls(model_dir, placement, {la.index: la.layout for la in layers}, layers[0].hidden_size, **kwargs)

    def _register(self, spec: ExpertFunction) -> _Function:
        if spec.layer not in self.layouts:
            raise MoeServeError(f"function {spec.id}: layer {spec.layer} is not a MoE layer of the model")
        if spec.id in self.functions:
            raise MoeServeError(f"duplicate expert function id {spec.id}")
        config = FunctionConfig(self.model_dir, spec, self.layouts[spec.layer], self.hidden_size,
                                str(self.dtype).removeprefix("torch."), self.num_threads, self.start_delay_s,
                                self.idle_spin_s)
        fn = self.functions[spec.id] = _Function(spec, config)
        for e in spec.experts:
            self._holders.setdefault((spec.layer, e), []).append(spec.id)
        return fn

    # ------------------------------------------------------------------------------------ lifecycle
    def add_function(self, spec: ExpertFunction, wait: bool = False) -> None:
        """Add a function (e.g. a replica of a predicted straggler, MoEless) and start it."""
        with self._lock:
            fn = self._register(spec)
            self._launch(fn)
            if wait:
                self._await_ready(fn)

    def remove_function(self, function_id: str) -> None:
        """Retire a function: stop its process and stop routing to it."""
        with self._lock:
            fn = self.functions.pop(function_id)
            self._shutdown(fn)
            for e in fn.spec.experts:
                self._holders[(fn.spec.layer, e)].remove(function_id)

    def start(self, wait: bool = True) -> ProcessBackend:
        """Start every function (in parallel); with `wait`, block until all serve."""
        _install_cleanup()
        _LIVE_BACKENDS.add(self)
        self._closing.clear()
        self.prewarm(list(self.functions), wait=wait)
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="moeserve-pool-reaper", daemon=True)
            self._reaper.start()
        return self

    def prewarm(self, function_ids: list[str], wait: bool = False) -> None:
        """Start the given functions if stopped (e.g. the ones a request's predicted experts need)."""
        with self._lock:
            for fid in function_ids:
                self._launch(self.functions[fid])
            if wait:
                for fid in function_ids:
                    fn = self.functions[fid]
                    if not self._await_ready(fn):
                        raise MoeServeError(f"expert function {fid} did not start: {fn.last_error or 'timed out'}")

    def stop(self) -> None:
        """Stop every process and release every shared-memory segment. Idempotent."""
        self._closing.set()
        reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(timeout=2.0)
        with self._lock:
            for fn in self.functions.values():  # all exit in parallel
                if fn.proc is not None:
                    fn.proc.request_stop()
            for fn in self.functions.values():
                self._shutdown(fn)
            for x_in in self._inputs.values():
                x_in.release()
            self._inputs.clear()
        _LIVE_BACKENDS.discard(self)

    def __enter__(self) -> ProcessBackend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _launch(self, fn: _Function) -> None:
        if fn.state != STOPPED:
            return
        fn.proc = FunctionProcess(fn.config)
        fn.proc.start()
        fn.state = STARTING
        log.info("function %s (layer %d, %d experts) starting", fn.spec.id, fn.spec.layer, len(fn.spec.experts))

    def _check_started(self, fn: _Function, timeout: float = 0.0) -> bool:
        """Move a starting function to READY when it reports in; on a failed start, stop it."""
        if fn.state == READY:
            return True
        if fn.state != STARTING:
            return False
        try:
            ready = fn.proc.wait_ready(timeout) if timeout > 0 else fn.proc.poll_ready()
        except FunctionError as exc:
            log.warning("%s", exc)
            fn.counters.failures += 1
            fn.last_error = str(exc)
            self._shutdown(fn)
            return False
        if ready:
            fn.state, fn.last_used = READY, time.monotonic()
            fn.counters.cold_starts += 1
            fn.counters.last_cold_start_s = fn.proc.cold_start_s
            fn.counters.cold_start_s += fn.proc.cold_start_s
            log.info("function %s ready in %.2f s (rss %.0f MB)", fn.spec.id, fn.proc.cold_start_s,
                     mib(fn.proc.ready_info["rss_bytes"]))
        return ready

    def _await_ready(self, fn: _Function) -> bool:
        """Wait (lock held on entry; released while waiting) until `fn` serves, fails or times out."""
        deadline = time.perf_counter() + self.start_timeout_s
        while fn.state == STARTING and not self._check_started(fn) and time.perf_counter() < deadline:
            self._changed.wait(0.01)
        return fn.state == READY

    def _shutdown(self, fn: _Function) -> None:
        if fn.proc is not None:
            fn.proc.stop()
        fn.proc, fn.state, fn.in_flight = None, STOPPED, 0

    def _fail(self, fn: _Function, reason: str) -> None:
        """Count a failure, kill the process and start a fresh one (in the background)."""
        log.warning("function %s failed (%s): restarting it", fn.spec.id, reason)
        fn.last_error = reason
        fn.counters.failures += 1
        fn.counters.restarts += 1
        if fn.proc is not None:
            fn.proc.kill()
        fn.proc, fn.state, fn.in_flight = None, STOPPED, 0
        if not self._closing.is_set():
            self._launch(fn)

    def _reap_loop(self) -> None:
        while not self._closing.wait(self.reap_interval_s):
            try:
                self._reap_once()
            except Exception:  # keep reaping; a bug here must not silently end scale-to-zero
                log.exception("expert pool reaper")

    def _reap_once(self) -> None:
        with self._lock:
            now = time.monotonic()
            for fn in list(self.functions.values()):
                if fn.state == STARTING:
                    self._check_started(fn)
                elif fn.state == READY and fn.in_flight == 0:
                    if not fn.proc.is_alive():
                        self._fail(fn, "process exited")
                    elif now - fn.last_used > fn.spec.keep_alive_s:
                        log.info("function %s idle for %.1f s: scaling to zero", fn.spec.id, now - fn.last_used)
                        fn.counters.scaled_to_zero += 1
                        self._shutdown(fn)

    # ---------------------------------------------------------------------------------------- calls
    def holders(self, layer: int, expert: int) -> list[str]:
        """Ids of the functions holding `expert` of `layer` (its replicas)."""
        return self._holders.get((layer, expert), [])

    def _ready_holders(self, layer: int, expert: int, allowed: frozenset[str] | None) -> list[str]:
        """The holders of an expert that serve now. With none, bring one up: launch a stopped holder
        (scale from zero) and, with `wait_for_start`, wait for the first starting holder to be ready.
        Called with the lock held; the waiting releases it (a condition), so other threads (metrics,
        pre-warming, the reaper) go on while a function cold-starts."""
        holders = [self.functions[fid] for fid in self.holders(layer, expert) if allowed is None or fid in allowed]
        ready = [fn.spec.id for fn in holders if self._check_started(fn)]
        if ready or not holders or self._closing.is_set():
            return ready
        if not any(fn.state == STARTING for fn in holders):
            self._launch(holders[0])
        deadline = time.perf_counter() + (self.start_timeout_s if self.wait_for_start else 0.0)
        while True:
            ready = [fn.spec.id for fn in holders if fn.state == STARTING and self._check_started(fn)]
            starting = any(fn.state == STARTING for fn in holders)
            if ready or time.perf_counter() >= deadline or not starting or self._closing.is_set():
                return [fn.spec.id for fn in holders if fn.state == READY]
            self._changed.wait(0.01)

    def assign(self, layer: int, expert_loads: dict[int, int], allowed: frozenset[str] | None = None,
               ) -> tuple[dict[str, list[int]], list[int]]:
        """Choose a replica for each expert: expert -> pairs to compute there.

        Returns (function id -> its experts, experts no function can take now). Heaviest experts are placed
        first, each on the ready replica with the least work in flight (pairs already assigned included).
        `allowed`: only these functions (a placement using part of the pool's functions); None: all.
        """
        with self._lock:
            load = {fid: fn.in_flight for fid, fn in self.functions.items()}
            chosen: dict[str, list[int]] = {}
            unplaced = []
            for e in sorted(expert_loads, key=lambda e: -expert_loads[e]):
                candidates = self._ready_holders(layer, e, allowed)
                if not candidates:
                    unplaced.append(e)
                    continue
                fid = min(candidates, key=lambda f: (load[f], self.functions[f].counters.calls))
                load[fid] += expert_loads[e]
                self.functions[fid].last_used = time.monotonic()  # not reaped between assign and call
                chosen.setdefault(fid, []).append(e)
            return chosen, unplaced

    def call(self, function_id: str, x: torch.Tensor, token_rows: torch.Tensor, pair_rows: np.ndarray,
             pair_experts: np.ndarray, pair_weights: np.ndarray) -> RemoteCall:
        """Send one call (non-blocking). x [T, H] CPU; see `RemoteCall` for the other arguments. The layer's
        x goes to shared memory once for all its functions (the same tensor object is not copied again)."""
        rc = RemoteCall(function_id, self.functions[function_id].spec.layer, x, token_rows, pair_rows,
                        pair_experts, pair_weights)
        with self._lock:
            fn = self.functions.get(function_id)
            if fn is None or fn.state != READY:
                rc.failed = True
                return rc
            rc.sent_at = time.perf_counter()
            try:
                x_in = self._inputs.get(rc.layer)
                if x_in is None:
                    x_in = self._inputs[rc.layer] = LayerInput(self.hidden_size, self.dtype)
                x_in.write(rc.x)
                fn.proc.send_call(x_in, rc.token_rows, rc.pair_rows, rc.pair_experts, rc.pair_weights)
            except (OSError, ValueError) as exc:  # broken pipe: the process is gone
                self._fail(fn, f"send failed: {exc}")
                rc.failed = True
                return rc
            fn.in_flight += len(rc.pair_rows)
            fn.last_used = time.monotonic()
        return rc

    def collect(self, calls: list[RemoteCall]) -> list[torch.Tensor | None]:
        """Wait for the calls (one deadline for all); per call its y [U, H] (a shared-memory view, valid until
        the function's next call), or None when it failed (the function is then restarted).

        Spins on the answers in shared memory for `spin_s`, then sleeps in select() on the functions'
        response eventfds and pipes: a pipe that turns readable is a process that died."""
        results: list[torch.Tensor | None] = [None] * len(calls)
        procs = {}
        for i, rc in enumerate(calls):
            fn = None if rc.failed else self.functions.get(rc.function_id)
            if fn is None or fn.proc is None or fn.proc.conn is None:
                rc.failed = True
            else:
                procs[i] = fn.proc
        deadline = time.perf_counter() + self.call_timeout_s
        spin_until = time.perf_counter() + self.spin_s
        while procs:
            for i in [i for i, p in procs.items() if p.answered()]:
                del procs[i]
                results[i] = self._receive(calls[i])
            if not procs:
                break
            now = time.perf_counter()
            if now < spin_until:  # no sched_yield: under load it gives the core away for a whole slice
                continue
            if now >= deadline:  # hung: everything still pending timed out
                with self._lock:
                    for i in procs:
                        calls[i].failed = True
                        self._fail(self.functions[calls[i].function_id], f"no answer in {self.call_timeout_s} s")
                break
            waits = {}
            for i, p in procs.items():
                waits[p.resp_fd] = i
                waits[p.conn.fileno()] = i
            ready, _, _ = select.select(list(waits), [], [], deadline - now)
            for fd in ready:
                i = waits[fd]
                p = procs.get(i)
                if p is None:
                    continue
                if fd == p.resp_fd:
                    p.drain_wakeups()
                if p.answered() or fd != p.resp_fd:  # answered, or a pipe that closed: died mid-call
                    del procs[i]
                    results[i] = self._receive(calls[i])
        return results

    def _receive(self, rc: RemoteCall) -> torch.Tensor | None:
        with self._lock:
            fn = self.functions[rc.function_id]
            fn.in_flight = max(0, fn.in_flight - len(rc.pair_rows))
            try:
                y, compute_s = fn.proc.recv_result()
            except FunctionError as exc:
                rc.failed = True
                self._fail(fn, str(exc))
                return None
            c = fn.counters
            c.calls += 1
            c.pairs += len(rc.pair_rows)
            c.tokens += int(rc.token_rows.numel())
            c.latency_s += time.perf_counter() - rc.sent_at
            c.compute_s += compute_s
            rc.compute_s = compute_s
            fn.last_used = time.monotonic()
        for listener in self._call_listeners:
            listener(rc.function_id, compute_s)
        return y

    def ready_replicas(self, layer: int, experts: set[int], exclude: str,
                       allowed: frozenset[str] | None = None) -> list[str]:
        """Ready functions of `layer` holding every one of `experts`, but `exclude`, least busy first."""
        with self._lock:
            found = [fid for fid, fn in self.functions.items()
                     if fid != exclude and fn.state == READY and fn.spec.layer == layer
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
        with self._lock:
            return {fid: fn.proc.pid for fid, fn in self.functions.items() if fn.proc is not None and fn.proc.pid}

    def metrics(self) -> dict:
        """Counters for the metrics layer: a plain, JSON-serialisable dict. Takes the lock only to copy the
        counters (memory is read from /proc after it is released)."""
        with self._lock:
            snapshot = [(fid, fn.spec, fn.state, fn.proc, dict(vars(fn.counters))) for fid, fn in self.functions.items()]
            holders = {key: list(fids) for key, fids in self._holders.items()}
        per_fn = {}
        for fid, spec, state, proc, counters in snapshot:
            alive = state == READY and proc is not None and proc.is_alive()
            per_fn[fid] = {
                "layer": spec.layer, "experts": list(spec.experts), "state": state,
                "pid": proc.pid if proc is not None else None,
                "rss_bytes": proc.rss_bytes() if alive else 0,
                "weights_bytes": (proc.ready_info or {}).get("weights_bytes", 0) if proc else 0,
                **counters,
            }
        totals = {k: sum(f[k] for f in per_fn.values())
                  for k in ("calls", "pairs", "failures", "restarts", "cold_starts", "latency_s", "compute_s")}
        replicas = {f"{layer}:{e}": sum(per_fn[f]["state"] == READY for f in fids if f in per_fn)
                    for (layer, e), fids in holders.items()}
        return {"functions": per_fn, **totals, "functions_alive": sum(f["state"] == READY for f in per_fn.values()),
                "replicas_alive": replicas}
