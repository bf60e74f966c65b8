"""Round trip of hidden states to another local process, over the serving engine's transport.

The tensor bytes travel through two `multiprocessing.shared_memory` buffers (request, response); each
batch costs one small control message each way over a pipe. The peer copies the request into the
response (an echo), which is the least work a remote expert process can do with a batch.
"""

from __future__ import annotations

import multiprocessing as mp
import struct
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

_MESSAGE = struct.Struct("<q")  # payload size in bytes; -1 asks the peer to stop
_STOP = -1


def _echo_peer(conn, request_name: str, response_name: str) -> None:
    """Child process: for each control message copy n bytes from request to response, then ack."""
    request = shared_memory.SharedMemory(name=request_name)
    response = shared_memory.SharedMemory(name=response_name)
    src = np.ndarray((request.size,), dtype=np.uint8, buffer=request.buf)
    dst = np.ndarray((response.size,), dtype=np.uint8, buffer=response.buf)
    try:
        while True:
            (n,) = _MESSAGE.unpack(conn.recv_bytes())
            if n == _STOP:
                break
            dst[:n] = src[:n]
            conn.send_bytes(_MESSAGE.pack(n))
    except EOFError:  # the parent went away: nothing left to serve
        pass
    finally:
        del src, dst  # views into the segments must go before the segments can close
        request.close()
        response.close()
        conn.close()


@dataclass(frozen=True)
class TransportTiming:
    """nbytes: [N] one-way payload sizes, seconds: [N] median round-trip time of each."""

    nbytes: tuple[int, ...]
    seconds: tuple[float, ...]


class EchoPeer:
    """A local peer process reached through shared memory + a pipe. Use as a context manager:
    the process is joined (killed if it hangs) and both segments unlinked on exit, whatever happens.
    """

    def __init__(self, capacity_bytes: int, start_method: str = "spawn", timeout_s: float = 60.0):
        self.capacity = max(int(capacity_bytes), 1)
        self.timeout_s = timeout_s
        self._ctx = mp.get_context(start_method)
        self._segments: list[shared_memory.SharedMemory] = []
        self._process = None
        self._conn = None

    def __enter__(self) -> EchoPeer:
        try:
            self._segments = [shared_memory.SharedMemory(create=True, size=self.capacity) for _ in range(2)]
            request, response = self._segments
            self._request = np.ndarray((self.capacity,), dtype=np.uint8, buffer=request.buf)
            self._response = np.ndarray((self.capacity,), dtype=np.uint8, buffer=response.buf)
            self._conn, child_conn = self._ctx.Pipe(duplex=True)
            self._process = self._ctx.Process(target=_echo_peer, args=(child_conn, request.name, response.name),
                                              daemon=True)
            self._process.start()
            child_conn.close()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self._segments]

    def round_trip(self, payload: np.ndarray) -> np.ndarray:
        """Send `payload` (any contiguous array) to the peer and return its reply as a new uint8 array."""
        data = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
        n = data.size
        if n > self.capacity:
            raise ValueError(f"payload of {n} bytes exceeds the {self.capacity}-byte shared buffer")
        self._request[:n] = data
        self._conn.send_bytes(_MESSAGE.pack(n))
        if not self._conn.poll(self.timeout_s):
            raise TimeoutError(f"transport peer did not answer within {self.timeout_s} s")
        try:
            (echoed,) = _MESSAGE.unpack(self._conn.recv_bytes())
        except (EOFError, ConnectionResetError):
            raise RuntimeError(f"transport peer process exited (exit code {self._process.exitcode})") from None
        if echoed != n:
            raise RuntimeError(f"transport peer acknowledged {echoed} bytes, sent {n}")
        return self._response[:n].copy()

    def close(self) -> None:
        if self._conn is not None:
            try:
                if self._process is not None and self._process.is_alive():
                    self._conn.send_bytes(_MESSAGE.pack(_STOP))
            except (OSError, ValueError):
                pass
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=10)
            self._process.close()
            self._process = None
        self._request = self._response = None
        for segment in self._segments:
            segment.close()
            try:
                segment.unlink()
            except FileNotFoundError:
                pass
        self._segments = []


def measure_transport(nbytes: list[int], repeats: int = 50, warmup: int = 5, start_method: str = "spawn",
                      progress=None) -> TransportTiming:
    """Median round-trip seconds for payloads of each size in `nbytes` (one peer process for all sizes).

    progress: optional callable(i) for each size once it is measured.
    """
    sizes = sorted(int(n) for n in nbytes)
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]
    samples: list[list[float]] = [[] for _ in sizes]
    with EchoPeer(max(sizes), start_method=start_method) as peer:
        for payload in payloads:
            for _ in range(warmup):
                peer.round_trip(payload)
        for _ in range(repeats):  # interleaved, so a burst of load from elsewhere spoils no single size
            for i, payload in enumerate(payloads):
                t0 = time.perf_counter()
                peer.round_trip(payload)
                samples[i].append(time.perf_counter() - t0)
    if progress is not None:
        for i in range(len(sizes)):
            progress(i)
    return TransportTiming(nbytes=tuple(sizes), seconds=tuple(float(np.median(s)) for s in samples))
