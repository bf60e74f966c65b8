"""Engine: continuous-batching generation over one MoE model, on a background thread.

    engine = Engine(model, tokenizer, model_name="demo").start()
    out = engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    engine.shutdown()

`step()` = schedule -> run -> postprocess: the scheduler says which sequences join and which run, the
model runner prefills the newcomers and decodes the batch, postprocessing appends each token, applies
the stop rules and sends its event. Expert dispatch lives inside the model's forward (experts/dispatch.py
swaps the experts implementation); with no dispatch given the engine installs an all-local one, which
is what reports each forward's routing.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from moeserve.engine.config import EngineConfig
from moeserve.engine.handle import Completion, RequestHandle
from moeserve.engine.metrics import ServingMetrics
from moeserve.engine.model_runner import ModelRunner
from moeserve.engine.sampling import SamplingParams, TextAssembler, TokenLogprobs
from moeserve.engine.scheduler import EngineClosed, Scheduler
from moeserve.engine.sequence import Sequence, StepEvent
from moeserve.errors import MoeServeError
from moeserve.experts.dispatch import DispatchHandle, local_dispatch
from moeserve.models.adapter import text_config
from moeserve.plan.placement import ExpertPlacement

log = logging.getLogger("moeserve.serving")


class _LockedTokenizer:
    """A tokenizer shared by the HTTP worker threads (encode): Rust-backed fast tokenizers may refuse
    concurrent use ("Already borrowed"), so calls take turns. The engine's thread decodes with its own
    copy, so a long encode never stalls the running requests' next tokens."""

    def __init__(self, tokenizer):
        self._tokenizer, self._lock = tokenizer, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer.decode(*args, **kwargs)


class Engine:
    """Continuous batching over one model; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None, *, model_name: str = "model",
                 model_path: str | None = None, dispatch: DispatchHandle | None = None,
                 placement: ExpertPlacement | None = None, pricing=None,
                 on_arrival: Callable[[Sequence], None] | None = None, served_names: tuple[str, ...] = ()):
        """dispatch: the model's installed expert dispatch (none: an all-local one, installed unless the model
        has one already, and removed at shutdown by the engine that installed it). on_arrival: called with each accepted request before it is queued (e.g. to pre-warm
        the expert functions SPS predicts it will need, Remoe [IV-B]). served_names: the names clients may
        ask for in `model` (default: model_name)."""
        self.config = config or EngineConfig()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.encoder = _LockedTokenizer(copy.deepcopy(tokenizer))
        self.served_names = tuple(served_names) or (model_name,)
        self.model_name, self.model_path, self.on_arrival = self.served_names[0], model_path, on_arrival
        self.dispatch, self._owns_dispatch = (dispatch, False) if dispatch is not None else local_dispatch(model)
        self.backend = self.dispatch.backend
        self.placement = placement  # what the dispatch executes (None: all experts local)
        # with weights released by the dispatch, the experts modules no longer tell the expert count
        self.layers = [d.layer for d in self.dispatch.layers.values()]
        self.device = next(model.parameters()).device
        self.context_limit = _context_limit(model, self.config.max_model_len)
        # a prompt of more bytes than this cannot fit the context whatever its tokens: refused untokenised
        self.max_prompt_bytes = self.context_limit * _max_token_bytes(tokenizer) if self.context_limit else None
        self.eos_ids = _eos_ids(model, tokenizer)
        self.scheduler = Scheduler(self.config)
        self.runner = ModelRunner(model, self.dispatch.recorder)
        self.busy_s = 0.0  # time spent in steps (what a serverless main function is billed for)
        self.metrics = ServingMetrics(
            self._state, [la.index for la in self.layers], self.layers[0].num_experts,
            backend=self.backend, dispatch=self.dispatch, pricing=pricing, device=self.device)
        self._routing_listeners: list[Callable[[torch.Tensor], None]] = [self.metrics.observe_routing]
        self._on_shutdown: list[Callable[[], None]] = []
        self.created = int(time.time())
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def add_routing_listener(self, listener: Callable[[torch.Tensor], None]) -> None:
        """Call `listener(ids)` after every forward, ids: [tokens, moe_layers, top_k] long on the CPU (e.g. a
        MoEless load predictor that adds replicas of predicted stragglers). Runs on the engine's thread."""
        self._routing_listeners.append(listener)

    def add_shutdown_hook(self, stop: Callable[[], None]) -> None:
        """Call `stop()` at shutdown, after the last request and before the expert functions stop (e.g. the
        replica scaler's thread)."""
        self._on_shutdown.append(stop)

    def _on_routed(self, ids: torch.Tensor | None) -> None:
        if ids is None:
            return
        for listener in self._routing_listeners:
            try:
                listener(ids)
            except Exception:  # an observer must never fail the requests it observes
                log.exception("routing listener %r failed", listener)

    def _state(self) -> dict:
        waiting, running = self.scheduler.pending()
        return {"waiting": waiting, "running": running, "busy_s": self.busy_s}

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moeserve-engine", daemon=True)
            self._thread.start()
            log.info("engine started: %s on %s, max batch %d, max queue %d", self.model_name, self.device,
                     self.config.max_batch, self.config.max_queue)
        return self

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self.scheduler.has_work():
                    if self._closing:
                        return
                    self._wake.wait(timeout=0.5)
            try:
                self.step()
            except Exception:  # never leave accepted requests hanging on a dead thread
                log.exception("engine step failed")

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, finish every accepted one first. Then stop the expert
        backend (if any) and remove the dispatch the engine installed."""
        if self._closing and self._thread is None:
            return
        self._closing = True
        if not drain:
            self.scheduler.cancel_all()
        waiting, running = self.scheduler.pending()
        if waiting or running:
            log.info("draining %d running and %d waiting request(s)", running, waiting)
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for stop in self._on_shutdown:
            stop()
        if self.backend is not None:
            log.info("stopping the expert functions")
            self.backend.stop()
        if self._owns_dispatch:
            self.dispatch.remove()
        log.info("engine stopped")

    # ----------------------------------------------------------------------------- one iteration
    def step(self) -> None:
        """Schedule, run (the chunk of a long prompt, then the newcomers' prompts in one forward, then one
        decode step for the batch), postprocess."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        for seq in scheduled.cancelled:
            self._finish(seq, "cancelled")
        if scheduled.chunk is not None:
            self._guarded([scheduled.chunk[0]], self._prefill_chunk, *scheduled.chunk)
        if scheduled.admitted:
            self._guarded(list(scheduled.admitted), self._prefill, scheduled.admitted)
        if self.runner.rows:
            self._guarded(list(self.runner.rows), self._decode)
        self.busy_s += time.perf_counter() - start

    def _admit(self, seq: Sequence) -> None:
        seq.admitted = time.perf_counter()
        seq.text = TextAssembler(self.tokenizer, seq.params.stop)

    def _prefill(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._admit(seq)
        tokens, logprobs, routings = self.runner.prefill(seqs)
        if routings[0] is not None:
            self._on_routed(torch.cat(routings))
        joined = [seq for seq, token, lp, routing in zip(seqs, tokens, logprobs, routings, strict=True)
                  if not self._postprocess(seq, token, lp, None if routing is None else routing[-1:])]
        self._join(joined)

    def _prefill_chunk(self, seq: Sequence, start: int, end: int) -> None:
        if start == 0:
            self._admit(seq)
        token, logprobs, routing = self.runner.prefill_chunk(seq, start, end)
        self._on_routed(routing)
        if token is not None:
            done = self._postprocess(seq, token, logprobs, None if routing is None else routing[-1:])
            self._join([] if done else [seq])

    def _join(self, seqs: list[Sequence]) -> None:
        self.runner.join(seqs)
        for seq in seqs:
            self.scheduler.start_running(seq)

    def _decode(self) -> None:
        rows = list(self.runner.rows)
        tokens, logprobs, routing = self.runner.decode()
        self._on_routed(routing)
        for row, (seq, token, lp) in enumerate(zip(rows, tokens, logprobs, strict=True)):
            self._postprocess(seq, token, lp, None if routing is None else routing[row:row + 1])

    def _guarded(self, seqs: list[Sequence], fn: Callable, *args) -> None:
        """Run a model step; if it raises, fail the requests it served instead of the whole engine."""
        try:
            fn(*args)
        except Exception as exc:  # a bug or a dead device: the requests get an error, the server lives on
            log.exception("model step failed for %d request(s)", len(seqs))
            for seq in seqs:
                if not seq.finished:
                    seq.emit(StepEvent("", [], finished=True, finish_reason="error",
                                       error=f"{type(exc).__name__}: {exc}"))
                    self._finish(seq, "error", emit=False)

    def _postprocess(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None,
                     routing: torch.Tensor | None) -> bool:
        """Append a new token, apply the stop rules, send its event; -> whether the sequence finished."""
        now = time.perf_counter()
        params = seq.params
        seq.generated.append(token)
        seq.first_token = seq.first_token or now
        seq.last_token = now
        reason = None
        if token in self.eos_ids and not params.ignore_eos:
            reason = "stop"
        elif len(seq.generated) >= params.max_tokens:
            reason = "length"
        elif self.context_limit and seq.num_tokens >= self.context_limit:
            reason = "length"
        text = ""
        if seq.stream_text or params.stop or reason is not None:
            text = seq.text.push(seq.generated)
            if seq.text.stopped:
                reason = "stop"
        if reason is not None:
            text += seq.text.finish()
        routed = routing.tolist() if seq.return_routed_experts and routing is not None else None
        seq.emit(StepEvent(text, [token], routed, None if logprobs is None else [logprobs],
                           finished=reason is not None, finish_reason=reason))
        if reason is not None:
            self._finish(seq, reason, emit=False)
        return reason is not None

    def _finish(self, seq: Sequence, reason: str, emit: bool = True) -> None:
        seq.finish_reason = reason
        if emit:
            seq.emit(StepEvent("", [], finished=True, finish_reason=reason))
        self.runner.drop([seq])
        self.scheduler.finish(seq)
        self.metrics.observe_finished(seq.stats(time.perf_counter()))

    # ----------------------------------------------------------------------------------- requests
    def _check_prompt_bytes(self, text: str) -> None:
        limit = self.max_prompt_bytes
        if limit is not None and len(text) > limit // 4 and len(text.encode("utf-8", "replace")) > limit:
            raise MoeServeError(f"the prompt is longer than the model's context of {self.context_limit} tokens "
                                "could hold (refused before tokenising)")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Prompt text or token ids -> validated token ids. Thread-safe; call it off the event loop."""
        if isinstance(prompt, str):
            self._check_prompt_bytes(prompt)
            ids = self.encoder(prompt)["input_ids"]
        else:
            ids = list(prompt)
            vocab = self.model.get_input_embeddings().num_embeddings
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise MoeServeError(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise MoeServeError("the prompt is empty")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Chat messages -> prompt ids, with the tokenizer's chat template or, without one, a plain
        `role: content` transcript ending in `assistant:`."""
        self._check_prompt_bytes("".join(str(m.get("content", "")) for m in messages))
        if getattr(self.tokenizer, "chat_template", None):
            text = self.encoder.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self._check_prompt_bytes(text)
            ids = self.encoder(text, add_special_tokens=False)["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = self.encoder(text)["input_ids"]
        if not ids:
            raise MoeServeError("the chat prompt is empty")
        return ids

    def serves(self, name: str | None) -> bool:
        """Whether a request naming `name` as its model (None: any) is for this engine."""
        return name is None or name in self.served_names

    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> text (special tokens skipped). Thread-safe."""
        return self.encoder.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's own text, as in logprobs. Thread-safe."""
        return self.encoder.decode([token_id], skip_special_tokens=False)

    def submit(self, prompt: str | list[int], params: SamplingParams, *, return_routed_experts: bool = False,
               stream_text: bool = True, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. Raises MoeServeError (bad input), QueueFull (429) or EngineClosed (503)."""
        if self._closing:
            raise EngineClosed("the server is shutting down")
        params.validate()
        ids = self.encode_prompt(prompt)
        limit = self.context_limit
        if limit and len(ids) + params.max_tokens > limit:
            raise MoeServeError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                f"model's context length ({limit})")
        seq = Sequence(ids, params, return_routed_experts, stream_text)
        if self.on_arrival is not None:
            self.on_arrival(seq)
        handle = RequestHandle(seq, loop)
        seq.emit = handle.put
        self.scheduler.add(seq)
        with self._wake:
            self._wake.notify()
        return handle

    def generate(self, prompt: str | list[int], params: SamplingParams, **kwargs) -> Completion:
        """Submit and wait (the engine must be started)."""
        return self.submit(prompt, params, stream_text=False, **kwargs).result()

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)


def _context_limit(model: nn.Module, max_model_len: int | None) -> int | None:
    limit = int(getattr(text_config(model), "max_position_embeddings", 0) or 0) or None
    if max_model_len is None:
        return limit
    if limit and max_model_len > limit:
        raise MoeServeError(f"max_model_len {max_model_len} exceeds the model's context length ({limit})")
    return max_model_len


def _max_token_bytes(tokenizer) -> int:
    """UTF-8 bytes of the vocabulary's longest token (an upper bound on the text one token covers)."""
    try:
        return max((len(t.encode("utf-8", "replace")) for t in tokenizer.get_vocab()), default=64) or 64
    except Exception:  # a tokenizer without a readable vocabulary: a generous bound
        return 256


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids as `generate` uses them: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}
