"""MoEless while serving: replicas of straggler experts are added and retired from observed load.

Every `window_s` seconds the routed-token counts of the last window (from the engine's routing
listener) are checked per layer; a remote expert whose load exceeds `threshold` x its layer's mean
(a straggler, moeless/scaling.py) gets one more replica function, up to `max_copies` holders and
`max_added` live replicas in all, heaviest first; a replica
this scaler added is retired after `retire_after` windows in which its expert was no straggler. New
replicas start in the background and take traffic once ready (the pool only picks ready holders);
a retired replica stops receiving work before its process is stopped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from moeserve.defaults import KEEP_ALIVE_S, STRAGGLER_THRESHOLD
from moeserve.moeless.scaling import detect_stragglers
from moeserve.plan.ids import straggler_replica_id
from moeserve.plan.placement import ExpertFunction

log = logging.getLogger("moeserve.serving")


def straggler_changes(loads: np.ndarray, remote: np.ndarray, copies: np.ndarray, threshold: float,
                      max_copies: int) -> np.ndarray:
    """Remote stragglers that may get another replica. loads, remote (bool), copies: [L, E] -> [L, E] bool."""
    if loads.sum() == 0:
        return np.zeros_like(remote)
    return detect_stragglers(loads, threshold) & remote & (copies < max_copies)


@dataclass
class ReplicaScaler:
    """Owns the replicas it adds; `observe` is the engine's routing listener, `step` one decision."""

    dispatch: object  # experts.dispatch.DispatchHandle
    backend: object  # experts.backend.ExpertBackend
    window_s: float = 10.0
    threshold: float = STRAGGLER_THRESHOLD
    max_copies: int = 2
    retire_after: int = 3
    keep_alive_s: float = KEEP_ALIVE_S
    max_added: int = 4  # replicas this scaler keeps alive at once (each is a process of ~230 MB)
    added: dict[str, int] = field(default_factory=dict)  # replica id -> windows since its expert straggled
    events: list[tuple[str, str]] = field(default_factory=list)  # ("add" | "retire", function id)

    def __post_init__(self):
        self.layer_indices = sorted(self.dispatch.layers)
        num_experts = self.dispatch.layers[self.layer_indices[0]].layer.num_experts
        self._counts = np.zeros((len(self.layer_indices), num_experts), dtype=np.int64)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serial = 0

    def observe(self, ids) -> None:
        """ids: [tokens, L, K] expert ids of one forward."""
        ids = np.asarray(ids)
        layers, experts = self._counts.shape
        flat = (ids.astype(np.int64) + (np.arange(layers) * experts)[None, :, None]).ravel()
        counts = np.bincount(flat, minlength=layers * experts).reshape(layers, experts)
        with self._lock:
            self._counts += counts

    def _state(self) -> tuple[np.ndarray, np.ndarray]:
        """remote [L, E] bool and copies [L, E] int (functions of the dispatch holding each expert)."""
        remote = np.zeros(self._counts.shape, dtype=bool)
        copies = np.zeros(self._counts.shape, dtype=np.int64)
        specs = self.backend.specs()
        for row, index in enumerate(self.layer_indices):
            d = self.dispatch.layers[index]
            remote[row, sorted(d.remote)] = True
            for fid in d.allowed:  # the allowed set may be shared by every layer
                spec = specs.get(fid)
                if spec is not None and spec.layer == index:
                    copies[row, list(spec.experts)] += 1
        return remote, copies

    def step(self) -> None:
        """Decide on the window just ended and apply: add straggler replicas, retire idle ones."""
        with self._lock:
            loads, self._counts = self._counts, np.zeros_like(self._counts)
        remote, copies = self._state()
        grow = straggler_changes(loads.astype(np.float64), remote, copies, self.threshold, self.max_copies)
        straggling = detect_stragglers(loads.astype(np.float64), self.threshold) if loads.sum() else grow
        specs = self.backend.specs()
        for fid in list(self.added):
            spec = specs[fid]
            row = self.layer_indices.index(spec.layer)
            self.added[fid] = 0 if straggling[row, list(spec.experts)].any() else self.added[fid] + 1
            if self.added[fid] >= self.retire_after:
                self._retire(fid, row)
        rows, experts = np.nonzero(grow)
        for i in np.argsort(-loads[rows, experts], kind="stable"):  # heaviest stragglers first
            if len(self.added) >= self.max_added:
                break
            self._add(int(rows[i]), int(experts[i]))

    def _add(self, row: int, expert: int) -> None:
        index = self.layer_indices[row]
        self._serial += 1
        spec = ExpertFunction(straggler_replica_id(index, expert, self._serial), index, (expert,),
                              keep_alive_s=self.keep_alive_s)
        self.backend.add_function(spec, wait=False)  # starts in the background; taken once ready
        self.dispatch.layers[index].allow(spec.id)
        self.added[spec.id] = 0
        self.events.append(("add", spec.id))
        log.info("replica %s added for straggler expert %d of layer %d", spec.id, expert, index)

    def _retire(self, fid: str, row: int) -> None:
        self.dispatch.layers[self.layer_indices[row]].disallow(fid)  # no new work first; in flight: retried
        self.backend.remove_function(fid)
        del self.added[fid]
        self.events.append(("retire", fid))
        log.info("replica %s retired", fid)

    def start(self) -> ReplicaScaler:
        def loop():
            while not self._stop.wait(self.window_s):
                try:
                    self.step()
                except Exception:  # scaling is an optimisation: never take serving down
                    log.exception("replica scaling step failed")

        self._thread = threading.Thread(target=loop, name="moeserve-replica-scaler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
