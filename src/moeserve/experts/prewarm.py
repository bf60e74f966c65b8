"""Remoe's request-arrival step while serving: SPS predicts which experts a prompt will use, and the
expert functions holding them are started before the request reaches their layers [IV-B].

Functions stopped after their keep-alive (scale to zero) would otherwise pay their cold start inside
the request; pre-warming moves it to arrival time, overlapped with the queue wait and the prefill of
earlier layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.experts.backend import ExpertBackend
from moeserve.models.loading import load_input_embeddings
from moeserve.plan.placement import ExpertPlacement
from moeserve.remoe.sps import SpsPredictor
from moeserve.traces.activation import prompt_vector
from moeserve.traces.format import ExpertTrace

log = logging.getLogger("moeserve.serving")


def functions_to_prewarm(predicted: np.ndarray, layer_indices: list[int], placement: ExpertPlacement,
                         threshold: float) -> list[str]:
    """Functions holding remote experts whose predicted share adds up to >= threshold in their layer.

    predicted: [L, E] activation (rows sum to 1), rows in the order of layer_indices (decoder-layer
    indices). Experts that are also local are not counted (the engine prefers the local copy).
    """
    chosen = []
    for f in placement.functions:
        row = layer_indices.index(f.layer)
        remote = [e for e in f.experts if e in placement.remote_experts(f.layer)]
        if remote and float(predicted[row, remote].sum()) >= threshold:
            chosen.append(f.id)
    return chosen


@dataclass
class SpsPrewarmer:
    """Engine `on_arrival` hook: prompt ids -> prompt vector -> SPS activation -> backend.prewarm."""

    predictor: SpsPredictor  # built from a trace of this model
    embeddings: np.ndarray  # [vocab, hidden] input embeddings
    layer_indices: list[int]
    placement: ExpertPlacement
    backend: ExpertBackend
    threshold: float = 0.02
    prewarmed: dict[str, int] = field(default_factory=dict)  # function id -> times asked to pre-warm

    def __call__(self, request) -> None:
        vector = prompt_vector(self.embeddings[np.asarray(request.prompt_ids, dtype=np.int64)])
        predicted, _ = self.predictor.predict(vector[None])
        ids = functions_to_prewarm(predicted[0], self.layer_indices, self.placement, self.threshold)
        if ids:
            self.backend.prewarm(ids, wait=False)
            for fid in ids:
                self.prewarmed[fid] = self.prewarmed.get(fid, 0) + 1


def prewarmer_from_trace(trace_path: str, model_spec: str, layer_indices: list[int], placement: ExpertPlacement,
                         backend: ExpertBackend, threshold: float = 0.02) -> SpsPrewarmer:
    """The hook for an engine serving `placement` through `backend` (layer_indices: its MoE layers)."""
    trace = ExpertTrace.open(trace_path)
    if not trace.has("prompt_vectors"):
        raise MoeServeError(f"{trace_path} has no prompt vectors: SPS needs a trace from `moeserve profile`")
    if list(trace.meta.moe_layer_indices) != list(layer_indices):
        raise MoeServeError(f"{trace_path} is a trace of another model (MoE layers differ)")
    predictor = SpsPredictor.build(trace["prompt_vectors"], trace["prefill_activation"].astype(np.float64),
                                   trace["decode_activation"].astype(np.float64))
    log.info("SPS pre-warming on: %d history prompts from %s", trace.num_requests, trace_path)
    return SpsPrewarmer(predictor, load_input_embeddings(model_spec), list(layer_indices), placement, backend,
                        threshold)
