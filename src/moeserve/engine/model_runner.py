"""ModelRunner: the forwards, the batch's KV cache and the choice of each next token.

Prefill takes whole prompts together in one forward: one alone runs unpadded (bit-identical to
`generate`'s prefill); several run left-padded with their attention mask, and the dispatch is told which
token rows are real (`RoutingRecorder.real_rows`), so no pad token is routed to an expert or recorded.
A prompt longer than a step's budget is prefilled in chunks (`prefill_chunk`) into its own cache, which
it keeps between steps. The prefilled rows then join the decode batch; decode runs every running
sequence in one forward over the left-padded batch (kv_batch.py). After each forward the routing the
MoE layers saw is read from the dispatch's recorder.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from moeserve.engine.kv_batch import KVBatch, new_cache
from moeserve.engine.sampling import (
    TokenLogprobs,
    apply_penalties,
    choose_tokens,
    new_generator,
    token_logprobs,
)
from moeserve.engine.sequence import Sequence
from moeserve.experts.dispatch import RoutingRecorder
from moeserve.models.cache_names import cache_kwarg, output_cache


class ModelRunner:
    """Runs `model` for the engine. `rows`: the sequences whose KV rows make up the batch, in order."""

    def __init__(self, model: nn.Module, recorder: RoutingRecorder):
        self.model, self.recorder = model, recorder
        self.device = next(model.parameters()).device
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_arg = cache_kwarg(model)
        self.batch = KVBatch()
        self.rows: list[Sequence] = []
        self._pending: KVBatch | None = None  # the last prefill's rows, until `join`
        self._pending_seqs: list[Sequence] = []
        self._partial: dict[int, tuple[Sequence, DynamicCache]] = {}  # id(seq) -> its chunked prefill's cache
        self._last_cache = None
        # several prompts in one left-padded forward only where every layer keeps attention keys/values (pads
        # masked out); a linear-attention or convolution state would take the pads in, so those prefill alone
        kinds = set(getattr(model.config.get_text_config(decoder=True), "layer_types", None) or ())
        self.batched_prefill = kinds <= {"full_attention", "sliding_attention"} and new_cache(model) is not None

    def _forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model -> (last-position logits [B, V] float32, routing [tokens, moe_layers, top_k] or None).
        The cache the model used (its own class when it makes one) is left in `self._last_cache`."""
        if self._logits_to_keep:
            inputs["logits_to_keep"] = 1
        out = self.model(**inputs, use_cache=True)
        self._last_cache = output_cache(out) or inputs.get(self._cache_arg)
        return out.logits[:, -1, :].float(), self.recorder.take()

    def _start(self, seq: Sequence) -> None:
        if not seq.params.greedy:
            seq.generator = new_generator(seq.params.seed, self.device)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None], list[torch.Tensor | None]]:
        """Prefill whole prompts in one forward and choose each one's first token; their rows wait in
        `pending` until `join`. -> per sequence (token, its logprobs if asked for, routing of every prompt
        position [prompt tokens, moe_layers, top_k] or None)."""
        if len(seqs) > 1 and not self.batched_prefill:
            return self._prefill_one_by_one(seqs)
        for seq in seqs:
            self._start(seq)
        lengths = [len(s.prompt_ids) for s in seqs]
        width = max(lengths)
        cache = new_cache(self.model)  # the model's own kind; None: the model makes its own
        if len(seqs) == 1:
            ids = torch.tensor([seqs[0].prompt_ids], dtype=torch.long, device=self.device)
            logits, routing = self._forward(input_ids=ids, **{self._cache_arg: cache})
            mask = torch.ones((1, width), dtype=torch.long, device=self.device)
        else:  # left-padded, as the decode batch is; pads hidden from attention and from the experts
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, seq in enumerate(seqs):
                ids[i, width - lengths[i]:] = torch.tensor(seq.prompt_ids)
                mask[i, width - lengths[i]:] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            self.recorder.real_rows = mask.reshape(-1).nonzero().squeeze(1)
            try:
                logits, routing = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                **{self._cache_arg: cache})
            finally:
                self.recorder.real_rows = None
        cache = self._last_cache
        if len(seqs) > 1:
            pad = (mask == 0)[:, None, :, None]  # [B, 1, L, 1]: what pads left in the cache is never read
            for layer in getattr(cache, "layers", ()):
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] == width:
                        t.masked_fill_(pad, 0)
        self._pending, self._pending_seqs = KVBatch(cache, mask), list(seqs)
        tokens, logprobs = self._choose(logits, seqs)
        routings = [None] * len(seqs) if routing is None else list(torch.split(routing, lengths))
        return tokens, logprobs, routings

    def _prefill_one_by_one(self, seqs: list[Sequence]):
        combined, out = KVBatch(), ([], [], [])
        for seq in seqs:
            for acc, value in zip(out, self.prefill([seq]), strict=True):
                acc.extend(value)
            combined.extend(self._pending)
        self._pending, self._pending_seqs = combined, list(seqs)
        return out

    @torch.inference_mode()
    def prefill_chunk(self, seq: Sequence, start: int, end: int
                      ) -> tuple[int | None, TokenLogprobs | None, torch.Tensor | None]:
        """Prefill prompt positions [start, end) of `seq` into its own cache (kept between chunks). After the
        last chunk its first token is chosen and its rows wait in `pending` until `join`.
        -> (token or None before the last chunk, its logprobs, routing of these positions)."""
        if start == 0:
            self._start(seq)
            cache = new_cache(self.model)  # the model's own kind; None: the model makes its own
        else:
            cache = self._partial.pop(id(seq))[1]
        ids = torch.tensor([seq.prompt_ids[start:end]], dtype=torch.long, device=self.device)
        logits, routing = self._forward(input_ids=ids, **{self._cache_arg: cache})
        cache = self._last_cache
        if end < len(seq.prompt_ids):
            self._partial[id(seq)] = (seq, cache)
            return None, None, routing
        self._pending, self._pending_seqs = KVBatch.single(cache, end, self.device), [seq]
        (token,), (logprobs,) = self._choose(logits, [seq])
        return token, logprobs, routing

    def join(self, seqs: list[Sequence]) -> None:
        """These sequences of the last prefill (in its order) join the decode batch as its last rows; the
        others of that prefill (finished at their first token) are dropped."""
        index = {id(s): i for i, s in enumerate(self._pending_seqs)}
        keep = [index[id(s)] for s in seqs]
        pending, self._pending, self._pending_seqs = self._pending, None, []
        if not keep:
            return
        if keep != list(range(pending.size)):
            pending.keep(keep)
        self.batch.extend(pending)
        self.rows.extend(seqs)

    @torch.inference_mode()
    def decode(self) -> tuple[list[int], list[TokenLogprobs | None], torch.Tensor | None]:
        """One token for every row -> (tokens, their logprobs where asked for, routing [rows, moe_layers, top_k])."""
        mask, positions = self.batch.step_inputs()
        ids = torch.tensor([[seq.generated[-1]] for seq in self.rows], dtype=torch.long, device=self.device)
        if len(self.rows) == 1:  # one row has no padding: the model's own causal path, no mask to build
            logits, routing = self._forward(input_ids=ids, **{self._cache_arg: self.batch.cache})
        else:
            logits, routing = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                                            **{self._cache_arg: self.batch.cache})
        self.batch.advance(mask)
        tokens, logprobs = self._choose(logits, self.rows)
        return tokens, logprobs, routing

    @staticmethod
    def _choose(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [B, V] -> each row's next token (penalties, then greedy or sampled) and its logprobs."""
        params = [s.params for s in seqs]
        chosen_from = logits
        if any(p.penalised for p in params):
            chosen_from = apply_penalties(logits, params, [s.prompt_ids for s in seqs], [s.generated for s in seqs])
        tokens = choose_tokens(chosen_from, params, [s.generator for s in seqs])
        return tokens, token_logprobs(logits, tokens, params)

    def drop(self, seqs: list[Sequence]) -> None:
        """Remove these sequences' rows from the batch, or their chunked prefill (finished, cancelled, failed)."""
        gone = {id(s) for s in seqs}
        for g in gone:
            self._partial.pop(g, None)
        keep = [i for i, s in enumerate(self.rows) if id(s) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.batch.keep(keep)
