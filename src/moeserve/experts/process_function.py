"""An expert function: a separate OS process holding some routed experts of one MoE layer.

The process is started with the `spawn` method (torch and fork do not mix), loads only its experts from
the checkpoint (`serving.checkpoint`, memory mapped), reports its resident memory and load time, then
serves calls until told to stop or until its parent goes away.

Transport (see docs/serving-engine.md): shared memory for everything a call carries, eventfds to wake a
sleeper, and a pipe only for rare control messages. The main process owns every segment:

- `ctl` (one per function, fixed): int64 words REQ (sequence of the last call sent), RESP (of the last
  call answered), CTRL (control messages sent so far), ROWS U, PAIRS P, STATUS, R_ROWS, COMPUTE_NS,
  ERR_LEN, then the UTF-8 text of an error;
- `ring` (one per function, replaced when a call outgrows it): int32 token[N] (rows of the layer's input
  this call needs), int32 row[N] (pair -> index into token), int32 expert[N] (sorted), float32 weight[N],
  then y [N, H] (the result);
- `x` (one per MoE layer, shared by all its functions): the layer's hidden states [T, H], written once
  per layer call whatever the number of functions called.

A call: the main process fills the ring, sets ROWS/PAIRS, then REQ (last), then writes the function's
request eventfd. The function spins on REQ for `spin_s`, then sleeps in poll() on that eventfd and the
pipe; it answers into y, sets STATUS/R_ROWS/COMPUTE_NS, then RESP (last), and writes the response
eventfd, on which the main process spins then sleeps in the same way. A process that dies closes the
pipe (the waiting side sees it at once); one that hangs misses the call deadline. Control messages
over the pipe, each counted in CTRL before the REQ that depends on it:

    ATTACH <B op=2> + JSON {"ring": name, "cap": N, "x": name, "x_rows": rows}   (new or grown segments)
    STOP   <B op=3>
    FAULT  <B op=4> + mode ("hang", "nan", "exit", "bad_rows"; a test hook that breaks later calls)

Writes are ordered stores on x86-64 (TSO); each side reads the data only after it sees the sequence word.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import reduction, resource_tracker, shared_memory

import numpy as np
import psutil
import torch

from moeserve.defaults import FUNCTION_IDLE_SPIN_S
from moeserve.models.checkpoint import read_experts
from moeserve.models.expert_ffn import ExpertLayout, ExpertWeights, activation, expert_forward
from moeserve.plan.placement import ExpertFunction

OP_ATTACH, OP_STOP, OP_FAULT = 2, 3, 4
STATUS_OK, STATUS_ERROR = 0, 1
REQ, RESP, CTRL, ROWS, PAIRS, STATUS, R_ROWS, COMPUTE_NS, ERR_LEN = range(9)
_CTL_WORDS = 16
_ERR_BYTES = 1024
_CTL_BYTES = 8 * _CTL_WORDS + _ERR_BYTES
SHM_PREFIX = "moeserve"
_shm_counter = itertools.count()


@dataclass(frozen=True)
class FunctionConfig:
    """What an expert-function process needs to start: picklable, sent to the child at spawn."""

    model_dir: str
    spec: ExpertFunction
    layout: ExpertLayout
    hidden_size: int
    dtype: str = "float32"  # compute and transfer dtype (a torch dtype name)
    num_threads: int = 1
    start_delay_s: float = 0.0  # test hook: a slow cold start (e.g. experts on slow storage)
    spin_s: float = FUNCTION_IDLE_SPIN_S  # how long the function polls for its next call before it sleeps


class FunctionError(RuntimeError):
    """A call to an expert function failed: the process died, hung, or answered garbage."""


def ring_bytes(capacity: int, hidden: int, itemsize: int) -> int:
    """Bytes of a ring of `capacity` pairs (and rows): four [N] int32/float32 arrays, then y [N, H]."""
    return 16 * capacity + capacity * hidden * itemsize


class _RingViews:
    """Views into a ring segment's buffer (see the module docstring for the layout)."""

    def __init__(self, buf, capacity: int, hidden: int, dtype: torch.dtype):
        n = capacity
        self.capacity = capacity
        self.token = np.ndarray((n,), np.int32, buffer=buf, offset=0)
        self.row = np.ndarray((n,), np.int32, buffer=buf, offset=4 * n)
        self.expert = np.ndarray((n,), np.int32, buffer=buf, offset=8 * n)
        self.weight = np.ndarray((n,), np.float32, buffer=buf, offset=12 * n)
        self.y = torch.frombuffer(buf, dtype=dtype, count=n * hidden, offset=16 * n).view(n, hidden)


def _ctl_views(buf) -> tuple[np.ndarray, np.ndarray]:
    return np.ndarray((_CTL_WORDS,), np.int64, buffer=buf), np.ndarray((_ERR_BYTES,), np.uint8, buffer=buf,
                                                                         offset=8 * _CTL_WORDS)


class _Fd:
    """A file descriptor passed to the spawned child (duplicated into it by multiprocessing at spawn)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _rebuild_fd, (reduction.DupFd(self.fd),)


def _rebuild_fd(dup) -> int:
    return dup.detach()


# ---------------------------------------------------------------------------------------------- child side


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with the resource tracker: the main process owns, tracks and unlinks
    every segment (Python 3.11 has no `track=False`)."""

    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name, create=False)
    finally:
        resource_tracker.register = register


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


class _Server:
    """The child's state: its experts' weights and the attached shared-memory views."""

    def __init__(self, config: FunctionConfig, weights: dict[int, ExpertWeights]):
        self.config, self.weights = config, weights
        self.dtype = getattr(torch, config.dtype)
        self.act = None if config.layout.activation == "gptoss_swiglu" else activation(config.layout.activation)
        self.segments: list[shared_memory.SharedMemory] = []
        self.ring: _RingViews | None = None
        self.x_all: torch.Tensor | None = None
        self.fault = ""

    def attach(self, payload: bytes) -> None:
        desc = json.loads(payload)
        self.close()
        self.segments = [_attach(desc["ring"]), _attach(desc["x"])]
        hidden = self.config.hidden_size
        self.ring = _RingViews(self.segments[0].buf, desc["cap"], hidden, self.dtype)
        rows = desc["x_rows"]
        self.x_all = torch.frombuffer(self.segments[1].buf, dtype=self.dtype, count=rows * hidden).view(rows, hidden)

    def call(self, ctl: np.ndarray) -> tuple[int, float]:
        """Compute the call described by `ctl` and the ring into the ring's y; -> (rows answered, seconds)."""
        if self.fault == "exit":
            os._exit(3)
        if self.fault == "hang":
            time.sleep(3600)
        ring = self.ring
        n_rows, n_pairs = int(ctl[ROWS]), int(ctl[PAIRS])
        if ring is None or max(n_rows, n_pairs) > ring.capacity:
            raise RuntimeError("no shared-memory buffers attached for this call")
        t0 = time.perf_counter()
        token = torch.from_numpy(ring.token[:n_rows]).long()
        if int(token.max()) >= self.x_all.shape[0] or int(token.min()) < 0:
            raise RuntimeError("token rows outside the layer's input")
        x = self.x_all.index_select(0, token)
        y = ring.y[:n_rows]
        rows = torch.from_numpy(ring.row[:n_pairs]).long()
        experts = ring.expert[:n_pairs]
        pair_w = torch.from_numpy(ring.weight[:n_pairs]).to(self.dtype)
        # pairs arrive sorted by expert: one FFN per run of equal expert ids
        bounds = np.flatnonzero(np.diff(experts)) + 1
        starts, stops = np.r_[0, bounds], np.r_[bounds, n_pairs]
        if len(starts) == 1 and n_pairs == n_rows and bool((ring.row[:n_pairs] == np.arange(n_pairs)).all()):
            # one expert, one pair per row (decode at batch 1 always is): write the product straight into y
            e = int(experts[0])
            torch.mul(expert_forward(x, self.weights[e], self.config.layout, self.act), pair_w[:, None], out=y)
        else:
            y.zero_()
            for start, stop in zip(starts, stops, strict=True):
                if start == stop:
                    continue
                e = int(experts[start])
                r = rows[start:stop]
                out = expert_forward(x[r], self.weights[e], self.config.layout, self.act)
                y.index_put_((r,), out * pair_w[start:stop, None], accumulate=True)
        if self.fault == "nan":
            y[0, 0] = float("nan")
        return (n_rows + 1 if self.fault == "bad_rows" else n_rows), time.perf_counter() - t0

    def close(self) -> None:
        self.ring = self.x_all = None
        for seg in self.segments:
            seg.close()
        self.segments = []


def _control(server: _Server, msg: bytes) -> bool:
    """Handle one pipe message; False on STOP."""
    op = msg[0]
    if op == OP_ATTACH:
        try:
            server.attach(msg[1:])
        except (OSError, ValueError, TypeError):  # later calls answer an error; the parent restarts us
            server.close()
    elif op == OP_FAULT:
        server.fault = msg[1:].decode()
    elif op == OP_STOP:
        return False
    return True


def _serve(conn, server: _Server, ctl: np.ndarray, err: np.ndarray, req_fd: int, resp_fd: int) -> None:
    """The call loop: spin on REQ, else sleep on the request eventfd and the pipe (see the module docstring)."""
    poller = select.poll()
    poller.register(req_fd, select.POLLIN)
    poller.register(conn.fileno(), select.POLLIN)
    seen = int(ctl[REQ])
    controls = 0  # control messages read
    spin_s = server.config.spin_s
    while True:
        if ctl[REQ] == seen:
            deadline = time.perf_counter() + spin_s
            while ctl[REQ] == seen and time.perf_counter() < deadline:
                pass  # no sched_yield: on a loaded machine it hands the core to another job for a whole slice
        if ctl[REQ] == seen:
            for fd, _ in poller.poll():
                if fd == req_fd:
                    try:
                        os.eventfd_read(req_fd)
                    except BlockingIOError:
                        pass
                else:  # a control message, or EOF: the parent is gone
                    try:
                        msg = conn.recv_bytes()
                    except (EOFError, OSError):
                        return
                    controls += 1
                    if not _control(server, msg):
                        return
            continue
        while controls < ctl[CTRL]:  # sent before this call: they apply to it
            try:
                msg = conn.recv_bytes()
            except (EOFError, OSError):
                return
            controls += 1
            if not _control(server, msg):
                return
        seen = int(ctl[REQ])
        try:
            n_rows, compute_s = server.call(ctl)
            ctl[STATUS], ctl[R_ROWS], ctl[COMPUTE_NS], ctl[ERR_LEN] = STATUS_OK, n_rows, int(compute_s * 1e9), 0
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}".encode()[:_ERR_BYTES]
            err[:len(text)] = np.frombuffer(text, np.uint8)
            ctl[STATUS], ctl[R_ROWS], ctl[COMPUTE_NS], ctl[ERR_LEN] = STATUS_ERROR, 0, 0, len(text)
        ctl[RESP] = seen
        os.eventfd_write(resp_fd, 1)


def function_main(conn, config: FunctionConfig, ctl_name: str, req_fd: int, resp_fd: int) -> None:
    """Entry point of the expert-function process (run by multiprocessing's spawn)."""

    t0 = time.perf_counter()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(max(1, config.num_threads))
    time.sleep(config.start_delay_s)
    try:
        weights = read_experts(config.model_dir, config.spec.layer, config.spec.experts, config.layout,
                               getattr(torch, config.dtype))
        ctl_segment = _attach(ctl_name)
    except Exception as exc:  # reported to the parent, which raises it there
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    server = _Server(config, weights)
    ctl, err = _ctl_views(ctl_segment.buf)
    memory = psutil.Process().memory_full_info()
    conn.send({
        "ok": True, "pid": os.getpid(), "rss_bytes": memory.rss, "uss_bytes": memory.uss,
        "weights_bytes": sum(w.nbytes() for w in weights.values()), "load_s": time.perf_counter() - t0,
    })
    try:
        _serve(conn, server, ctl, err, req_fd, resp_fd)
    finally:
        server.close()
        del ctl, err
        ctl_segment.close()
        conn.close()


# ----------------------------------------------------------------------------------------------- main side


class _Segment:
    """A shared-memory segment created (and finally unlinked) by the main process."""

    def __init__(self, nbytes: int):
        name = f"{SHM_PREFIX}_{os.getpid()}_{next(_shm_counter)}"
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=max(nbytes, 1))

    @property
    def name(self) -> str:
        return self.shm.name

    def tensor(self, dtype: torch.dtype, rows: int, hidden: int) -> torch.Tensor:
        return torch.frombuffer(self.shm.buf, dtype=dtype, count=rows * hidden).view(rows, hidden)

    def release(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # a tensor view is still alive somewhere; the name goes anyway
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


class LayerInput:
    """One MoE layer's hidden states in shared memory, read by every function of the layer: x [rows, H].

    `write(x)` copies x once per layer call: a later call with the same tensor object (the layer's other
    functions, a retry) finds it there. It keeps a reference to the last x, so its identity stays unique;
    the caller must not change x in place between the calls of one layer.
    """

    def __init__(self, hidden: int, dtype: torch.dtype, initial_rows: int = 64):
        self.hidden, self.dtype, self._initial_rows = hidden, dtype, initial_rows
        self.segment: _Segment | None = None
        self.rows = 0
        self._x: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.segment.name

    def write(self, x: torch.Tensor) -> None:
        if x is self._last:
            return
        n = x.shape[0]
        if n > self.rows:
            self.release()
            self.rows = max(n, 2 * self.rows, self._initial_rows)
            self.segment = _Segment(self.rows * self.hidden * self.dtype.itemsize)
            self._x = self.segment.tensor(self.dtype, self.rows, self.hidden)
        self._x[:n].copy_(x)
        self._last = x

    def release(self) -> None:
        self._x = self._last = None
        if self.segment is not None:
            self.segment.release()
        self.segment, self.rows = None, 0


class FunctionProcess:
    """The main process's handle on one expert-function process and its shared memory and eventfds."""

    def __init__(self, config: FunctionConfig, initial_rows: int = 64):

        self.config = config
        self.dtype = getattr(torch, config.dtype)
        self._ctx = multiprocessing.get_context("spawn")
        self.conn = None
        self.process = None
        self.ready_info: dict | None = None
        self.started_at = 0.0
        self.cold_start_s: float | None = None
        self._initial_rows = initial_rows
        self._ctl_segment: _Segment | None = None
        self._ctl = self._err = None
        self._ring_segment: _Segment | None = None
        self._ring: _RingViews | None = None
        self._attached_x: str | None = None
        self._own_input: LayerInput | None = None  # for calls given a plain tensor
        self.req_fd = self.resp_fd = -1
        self._seq = 0
        self._controls = 0
        self._pending: tuple[int, int] | None = None  # (seq, rows) of the call in flight

    # -- lifecycle
    def start(self) -> None:
        """Spawn the process (returns at once; `wait_ready` / `poll_ready` tell when it serves)."""
        self._ctl_segment = _Segment(_CTL_BYTES)
        self._ctl, self._err = _ctl_views(self._ctl_segment.shm.buf)
        self._ctl[:] = 0
        self.req_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.resp_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        parent, child = self._ctx.Pipe(duplex=True)
        self.process = self._ctx.Process(
            target=function_main, args=(child, self.config, self._ctl_segment.name, _Fd(self.req_fd),
                                        _Fd(self.resp_fd)),
            daemon=True, name=f"moeserve-fn-{self.config.spec.id}")
        self.started_at = time.perf_counter()
        self.process.start()
        child.close()
        self.conn = parent

    def poll_ready(self, timeout: float = 0.0) -> bool:
        """True once the process reported ready; raises FunctionError if it failed to load."""
        if self.ready_info is not None:
            return True
        try:
            if not self.conn.poll(timeout):
                if not self.process.is_alive():
                    raise FunctionError(f"function {self.config.spec.id} exited during start-up")
                return False
            info = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise FunctionError(f"function {self.config.spec.id} died during start-up") from exc
        if not info.get("ok"):
            raise FunctionError(f"function {self.config.spec.id} failed to load: {info.get('error')}")
        self.ready_info = info
        self.cold_start_s = time.perf_counter() - self.started_at
        return True

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not self.poll_ready(min(0.05, max(0.0, deadline - time.perf_counter()))):
            if time.perf_counter() >= deadline:
                return False
        return True

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def rss_bytes(self) -> int:

        try:
            return psutil.Process(self.pid).memory_info().rss if self.is_alive() else 0
        except psutil.Error:
            return 0

    def _send_control(self, msg: bytes) -> None:
        self.conn.send_bytes(msg)
        self._controls += 1
        self._ctl[CTRL] = self._controls

    def request_stop(self) -> None:
        """Ask the process to exit (returns at once; `stop` then waits)."""
        if self.process is not None and self.conn is not None and self.process.is_alive():
            try:
                self._send_control(bytes([OP_STOP]))
            except OSError:
                pass

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the process to exit, then terminate/kill it if it does not; release the shared memory."""
        if self.process is not None:
            self.request_stop()
            self.process.join(timeout)
            self.kill()
        self._release_segments()

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(1.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(1.0)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.process is not None and self.process.exitcode is not None:
            self.process.close()
            self.process = None
        self._pending = None
        self._release_segments()

    def _release_segments(self) -> None:
        self._ring = None
        if self._ring_segment is not None:
            self._ring_segment.release()
        self._ring_segment, self._attached_x = None, None
        if self._own_input is not None:
            self._own_input.release()
            self._own_input = None
        if self.process is None:  # the control segment and eventfds live as long as the process
            self._ctl = self._err = None
            if self._ctl_segment is not None:
                self._ctl_segment.release()
                self._ctl_segment = None
            for fd in (self.req_fd, self.resp_fd):
                if fd >= 0:
                    os.close(fd)
            self.req_fd = self.resp_fd = -1

    # -- calls
    def _ensure_rows(self, rows: int, x_in: LayerInput | None = None) -> None:
        """A ring for calls of up to `rows` pairs, and the child attached to it and to `x_in`."""
        if x_in is None:
            self._own_input = self._own_input or LayerInput(self.config.hidden_size, self.dtype)
            if self._own_input.segment is None:
                self._own_input.write(torch.zeros(1, self.config.hidden_size, dtype=self.dtype))
            x_in = self._own_input
        grow = self._ring is None or rows > self._ring.capacity
        if not grow and self._attached_x == x_in.name:
            return
        if grow:
            old = self._ring_segment
            capacity = max(rows, 2 * (self._ring.capacity if self._ring else 0), self._initial_rows)
            self._ring_segment = _Segment(ring_bytes(capacity, self.config.hidden_size, self.dtype.itemsize))
            self._ring = _RingViews(self._ring_segment.shm.buf, capacity, self.config.hidden_size, self.dtype)
            if old is not None:
                old.release()
        self._send_control(bytes([OP_ATTACH]) + json.dumps(
            {"ring": self._ring_segment.name, "cap": self._ring.capacity, "x": x_in.name,
             "x_rows": x_in.rows}).encode())
        self._attached_x = x_in.name

    def send_call(
        self, x: torch.Tensor | LayerInput, token_rows: torch.Tensor, pair_rows: np.ndarray,
        pair_experts: np.ndarray, pair_weights: np.ndarray,
    ) -> None:
        """Start a call (non-blocking). x: the layer's input already in shared memory (a `LayerInput`
        written for this layer call), or a tensor [T, H] on the CPU (copied into this function's own
        input); token_rows [U] int64 (the rows of x the pairs use), pair_rows [P] int32 (into token_rows),
        pair_experts [P] int32 sorted, pair_weights [P] float32."""
        n_rows, n_pairs = int(token_rows.numel()), len(pair_rows)
        if isinstance(x, LayerInput):
            x_in = x
        else:
            self._own_input = self._own_input or LayerInput(self.config.hidden_size, self.dtype)
            self._own_input.write(x)
            x_in = self._own_input
        self._ensure_rows(max(n_rows, n_pairs), x_in)
        ring, ctl = self._ring, self._ctl
        ring.token[:n_rows] = token_rows.numpy()
        ring.row[:n_pairs] = pair_rows
        ring.expert[:n_pairs] = pair_experts
        ring.weight[:n_pairs] = pair_weights
        ctl[ROWS], ctl[PAIRS] = n_rows, n_pairs
        self._seq += 1
        ctl[REQ] = self._seq
        self._pending = (self._seq, n_rows)
        os.eventfd_write(self.req_fd, 1)

    def answered(self) -> bool:
        """Whether the call in flight has its answer in shared memory (a load, no system call)."""
        return self._pending is not None and int(self._ctl[RESP]) == self._pending[0]

    def drain_wakeups(self) -> None:
        """Reset the response eventfd (after a wake-up, or before a wait that follows a spin)."""
        try:
            os.eventfd_read(self.resp_fd)
        except BlockingIOError:
            pass

    def recv_result(self) -> tuple[torch.Tensor, float]:
        """The answered call's result, y [U, H] (a view into shared memory, valid until the next call), and
        the compute seconds the function reported. Raises FunctionError on any sign of trouble."""
        if self._pending is None:
            raise FunctionError("no call in flight")
        if not self.answered():
            self._pending = None
            alive = self.is_alive()
            raise FunctionError(f"function {self.config.spec.id} {'closed its pipe' if alive else 'died'} mid-call")
        seq, n_rows = self._pending
        self._pending = None
        ctl = self._ctl
        status, r_rows, compute_s = int(ctl[STATUS]), int(ctl[R_ROWS]), int(ctl[COMPUTE_NS]) * 1e-9
        if status != STATUS_OK:
            text = bytes(self._err[:int(ctl[ERR_LEN])]).decode(errors="replace")
            raise FunctionError(f"function {self.config.spec.id}: {text}")
        if r_rows != n_rows:
            raise FunctionError(f"function {self.config.spec.id} answered seq {seq} with {r_rows} rows, "
                                f"expected {n_rows}")
        y = self._ring.y[:n_rows]
        if not bool(torch.isfinite(y).all()):
            raise FunctionError(f"function {self.config.spec.id} returned non-finite values")
        return y, compute_s

    def inject_fault(self, mode: str) -> None:
        """Test hook: make this process misbehave on every later call ("hang", "nan", "exit", "bad_rows")."""
        self._send_control(bytes([OP_FAULT]) + mode.encode())
