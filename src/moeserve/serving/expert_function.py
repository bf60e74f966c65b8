"""An expert function: a separate OS process holding some routed experts of one MoE layer.

The process is started with the `spawn` method (torch and fork do not mix), loads only its experts from
the checkpoint (`serving.checkpoint`, memory mapped), reports its resident memory and load time, then
serves calls until told to stop or until its parent goes away.

Transport (see docs/serving-engine.md): the main process owns two shared-memory segments per process,
`in` (hidden states) and `out` (results), and sends one small control message per call over a pipe:

    CALL   <B op=1><I seq><I rows U><I pairs P> + int32 row[P] + int32 expert[P] + float32 weight[P]
    ATTACH <B op=2> + JSON {"in": name, "out": name, "rows": capacity}   (segments replaced when grown)
    STOP   <B op=3>
    FAULT  <B op=4> + mode ("hang", "nan", "exit", "bad_rows"; a test hook that breaks later calls)

`in` holds x [U, H] (the distinct tokens routed to this function), pairs are sorted by expert. The
reply is `<B status><I seq><I rows><d compute_s>` (+ a UTF-8 error when status != 0) and `out` then
holds the weighted partial sum y [U, H] = sum over pairs of weight * expert(x[row]).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.nn.functional as F

from moeserve.models.adapter import ExpertLayout, ExpertWeights
from moeserve.serving.placement import FunctionSpec

OP_CALL, OP_ATTACH, OP_STOP, OP_FAULT = 1, 2, 3, 4
STATUS_OK, STATUS_ERROR = 0, 1
_CALL_HEAD = struct.Struct("<BIII")
_REPLY_HEAD = struct.Struct("<BIId")
SHM_PREFIX = "moeserve"
_shm_counter = itertools.count()


@dataclass(frozen=True)
class FunctionConfig:
    """What an expert-function process needs to start: picklable, sent to the child at spawn."""

    model_dir: str
    spec: FunctionSpec
    layout: ExpertLayout
    hidden_size: int
    dtype: str = "float32"  # compute and transfer dtype (a torch dtype name)
    num_threads: int = 1


class FunctionError(RuntimeError):
    """A call to an expert function failed: the process died, hung, or answered garbage."""


# ---------------------------------------------------------------------------------------------- child side


def _activation(name: str):
    fast = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    if name in fast:
        return fast[name]
    from transformers.activations import ACT2FN  # ~1 s of imports: only for rare activations

    return ACT2FN[name]


def expert_ffn(x: torch.Tensor, w: ExpertWeights, layout: ExpertLayout, act) -> torch.Tensor:
    """One expert's FFN, x [T, H] -> [T, H]: the same arithmetic as `adapter.expert_forward`."""
    if layout.activation == "gptoss_swiglu":
        gate = F.linear(x, w.gate, w.gate_bias).clamp(max=layout.swiglu_limit)
        up = F.linear(x, w.up, w.up_bias).clamp(min=-layout.swiglu_limit, max=layout.swiglu_limit)
        h = (up + 1) * gate * torch.sigmoid(gate * layout.swiglu_alpha)
    elif w.gate is not None:
        h = act(F.linear(x, w.gate, w.gate_bias)) * F.linear(x, w.up, w.up_bias)
    else:
        h = act(F.linear(x, w.up, w.up_bias))
    return F.linear(h, w.down, w.down_bias)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with the resource tracker: the main process owns, tracks and unlinks
    every segment (Python 3.11 has no `track=False`)."""
    from multiprocessing import resource_tracker

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
        self.act = None if config.layout.activation == "gptoss_swiglu" else _activation(config.layout.activation)
        self.segments: list[shared_memory.SharedMemory] = []
        self.x_all = self.y_all = None
        self.fault = ""

    def attach(self, payload: bytes) -> None:
        desc = json.loads(payload)
        self.x_all = self.y_all = None
        for seg in self.segments:
            seg.close()
        self.segments = [_attach(desc["in"]), _attach(desc["out"])]
        rows, hidden = desc["rows"], self.config.hidden_size
        self.x_all = torch.frombuffer(self.segments[0].buf, dtype=self.dtype, count=rows * hidden).view(rows, hidden)
        self.y_all = torch.frombuffer(self.segments[1].buf, dtype=self.dtype, count=rows * hidden).view(rows, hidden)

    def call(self, msg: bytes) -> tuple[int, float]:
        _, _seq, n_rows, n_pairs = _CALL_HEAD.unpack_from(msg)
        arrays = np.frombuffer(msg, dtype=np.int32, count=2 * n_pairs, offset=_CALL_HEAD.size)
        weights = np.frombuffer(msg, dtype=np.float32, count=n_pairs, offset=_CALL_HEAD.size + 8 * n_pairs)
        rows = torch.from_numpy(arrays[:n_pairs].astype(np.int64))
        experts = arrays[n_pairs:]
        pair_w = torch.from_numpy(weights.copy()).to(self.dtype)
        if self.fault == "exit":
            os._exit(3)
        if self.fault == "hang":
            time.sleep(3600)
        if self.x_all is None or n_rows > self.x_all.shape[0]:
            raise RuntimeError("no shared-memory buffers attached for this call")
        t0 = time.perf_counter()
        x, y = self.x_all[:n_rows], self.y_all[:n_rows]
        y.zero_()
        # pairs arrive sorted by expert: one FFN per run of equal expert ids
        bounds = np.flatnonzero(np.diff(experts)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, n_pairs], strict=True):
            if start == stop:
                continue
            e = int(experts[start])
            r = rows[start:stop]
            out = expert_ffn(x[r], self.weights[e], self.config.layout, self.act)
            y.index_put_((r,), out * pair_w[start:stop, None], accumulate=True)
        if self.fault == "nan":
            y[0, 0] = float("nan")
        return (n_rows + 1 if self.fault == "bad_rows" else n_rows), time.perf_counter() - t0

    def close(self) -> None:
        self.x_all = self.y_all = None
        for seg in self.segments:
            seg.close()


def function_main(conn, config: FunctionConfig) -> None:
    """Entry point of the expert-function process (run by multiprocessing's spawn)."""
    import psutil

    from moeserve.serving.checkpoint import read_experts

    t0 = time.perf_counter()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(max(1, config.num_threads))
    try:
        weights = read_experts(config.model_dir, config.spec.layer, config.spec.experts, config.layout,
                               getattr(torch, config.dtype))
    except Exception as exc:  # reported to the parent, which raises it there
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    server = _Server(config, weights)
    memory = psutil.Process().memory_full_info()
    conn.send({
        "ok": True, "pid": os.getpid(), "rss_bytes": memory.rss, "uss_bytes": memory.uss,
        "weights_bytes": sum(w.nbytes() for w in weights.values()), "load_s": time.perf_counter() - t0,
    })
    try:
        while True:
            try:
                msg = conn.recv_bytes()
            except (EOFError, OSError):  # the parent is gone
                break
            op = msg[0]
            if op == OP_CALL:
                seq = _CALL_HEAD.unpack_from(msg)[1]
                try:
                    n_rows, compute_s = server.call(msg)
                    conn.send_bytes(_REPLY_HEAD.pack(STATUS_OK, seq, n_rows, compute_s))
                except Exception as exc:
                    conn.send_bytes(_REPLY_HEAD.pack(STATUS_ERROR, seq, 0, 0.0) + f"{type(exc).__name__}: {exc}".encode())
            elif op == OP_ATTACH:
                try:
                    server.attach(msg[1:])
                except (OSError, ValueError):  # later calls answer an error; the parent restarts us
                    server.x_all = server.y_all = None
            elif op == OP_FAULT:
                server.fault = msg[1:].decode()
            elif op == OP_STOP:
                break
    finally:
        server.close()
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


class FunctionProcess:
    """The main process's handle on one expert-function process and its shared-memory buffers."""

    def __init__(self, config: FunctionConfig, initial_rows: int = 64):
        import multiprocessing

        self.config = config
        self.dtype = getattr(torch, config.dtype)
        self._ctx = multiprocessing.get_context("spawn")
        self.conn = None
        self.process = None
        self.ready_info: dict | None = None
        self.started_at = 0.0
        self.cold_start_s: float | None = None
        self._rows = 0
        self._segments: list[_Segment] = []
        self._x = self._y = None
        self._initial_rows = initial_rows
        self._seq = 0
        self._pending: tuple[int, int] | None = None  # (seq, rows) of the call in flight

    # -- lifecycle
    def start(self) -> None:
        """Spawn the process (returns at once; `wait_ready` / `poll_ready` tell when it serves)."""
        parent, child = self._ctx.Pipe(duplex=True)
        self.process = self._ctx.Process(target=function_main, args=(child, self.config), daemon=True,
                                         name=f"moeserve-fn-{self.config.spec.id}")
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
        import psutil

        try:
            return psutil.Process(self.pid).memory_info().rss if self.is_alive() else 0
        except psutil.Error:
            return 0

    def request_stop(self) -> None:
        """Ask the process to exit (returns at once; `stop` then waits)."""
        if self.process is not None and self.conn is not None and self.process.is_alive():
            try:
                self.conn.send_bytes(bytes([OP_STOP]))
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
        self._x = self._y = None
        for seg in self._segments:
            seg.release()
        self._segments, self._rows = [], 0

    # -- calls
    def _ensure_rows(self, rows: int) -> None:
        if rows <= self._rows:
            return
        capacity = max(rows, 2 * self._rows, self._initial_rows)
        nbytes = capacity * self.config.hidden_size * self.dtype.itemsize
        new = [_Segment(nbytes), _Segment(nbytes)]
        self.conn.send_bytes(bytes([OP_ATTACH]) + json.dumps(
            {"in": new[0].name, "out": new[1].name, "rows": capacity}).encode())
        self._release_segments()
        self._segments, self._rows = new, capacity
        self._x = new[0].tensor(self.dtype, capacity, self.config.hidden_size)
        self._y = new[1].tensor(self.dtype, capacity, self.config.hidden_size)

    def send_call(
        self, x: torch.Tensor, token_rows: torch.Tensor, pair_rows: np.ndarray, pair_experts: np.ndarray,
        pair_weights: np.ndarray,
    ) -> None:
        """Start a call (non-blocking): x [T, H] on the CPU, token_rows [U] int64 (the tokens to send),
        pair_rows [P] int32 (into token_rows), pair_experts [P] int32 sorted, pair_weights [P] float32."""
        n_rows = int(token_rows.numel())
        self._ensure_rows(n_rows)
        dst = self._x[:n_rows]
        if x.dtype == self.dtype:
            torch.index_select(x, 0, token_rows, out=dst)
        else:
            dst.copy_(x.index_select(0, token_rows))
        self._seq = (self._seq + 1) % (1 << 32)
        msg = b"".join((_CALL_HEAD.pack(OP_CALL, self._seq, n_rows, len(pair_rows)),
                        pair_rows.astype(np.int32, copy=False).tobytes(),
                        pair_experts.astype(np.int32, copy=False).tobytes(),
                        pair_weights.astype(np.float32, copy=False).tobytes()))
        self._pending = (self._seq, n_rows)
        self.conn.send_bytes(msg)

    def recv_result(self) -> tuple[torch.Tensor, float]:
        """The pending call's result, y [U, H] (a view into shared memory, valid until the next call), and
        the compute seconds the function reported. Raises FunctionError on any sign of trouble."""
        if self._pending is None:
            raise FunctionError("no call in flight")
        seq, n_rows = self._pending
        self._pending = None
        try:
            reply = self.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise FunctionError(f"function {self.config.spec.id} died mid-call") from exc
        status, r_seq, r_rows, compute_s = _REPLY_HEAD.unpack_from(reply)
        if status != STATUS_OK:
            raise FunctionError(f"function {self.config.spec.id}: {reply[_REPLY_HEAD.size:].decode()}")
        if r_seq != seq or r_rows != n_rows:
            raise FunctionError(f"function {self.config.spec.id} answered seq {r_seq} rows {r_rows}, "
                                f"expected {seq} rows {n_rows}")
        y = self._y[:n_rows]
        if not bool(torch.isfinite(y).all()):
            raise FunctionError(f"function {self.config.spec.id} returned non-finite values")
        return y, compute_s

    def inject_fault(self, mode: str) -> None:
        """Test hook: make this process misbehave on every later call ("hang", "nan", "exit", "bad_rows")."""
        self.conn.send_bytes(bytes([OP_FAULT]) + mode.encode())
