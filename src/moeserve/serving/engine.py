"""The serving engine: a model, its tokenizer, an optional expert pool, and a scheduler thread.

    engine = Engine(model, tokenizer, model_name="demo").start()
    out = engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    engine.shutdown()

Expert dispatch lives inside the model's forward (dispatch.py swaps the experts implementation), so the
engine only runs a Hugging Face model; `pool` and `dispatch`, when given, are only observed (metrics)
and stopped on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeserve.errors import MoeServeError
from moeserve.serving.metrics import ServingMetrics
from moeserve.serving.placement import ExpertPlacement
from moeserve.serving.sampling import SamplingParams
from moeserve.serving.scheduler import EngineClosed, GenerationRequest, Scheduler, StepEvent

log = logging.getLogger("moeserve.serving")


@dataclass(frozen=True)
class Completion:
    """A finished request. routed_experts: per generated token, expert ids [moe_layers][top_k]."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    routed_experts: list[list[list[int]]] | None = None
    error: str | None = None


class RequestHandle:
    """The events of one request, read synchronously (`events`, `result`) or from an event loop
    (`aevents`, `aresult`) when the handle was made with that loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request, self.loop = request, loop
        self._sync: queue.SimpleQueue[StepEvent] = queue.SimpleQueue()
        self._async: asyncio.Queue[StepEvent] | None = asyncio.Queue() if loop is not None else None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def put(self, event: StepEvent) -> None:
        """Called on the scheduler thread."""
        if self.loop is None:
            self._sync.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def events(self, timeout: float | None = None) -> Iterator[StepEvent]:
        while True:
            event = self._sync.get(timeout=timeout)
            yield event
            if event.finished:
                return

    async def aevents(self) -> AsyncIterator[StepEvent]:
        while True:
            event = await self._async.get()
            yield event
            if event.finished:
                return

    def _collect(self, events: list[StepEvent]) -> Completion:
        last = events[-1]
        routed = [r for e in events for r in (e.routed or [])] if self.request.return_routed_experts else None
        return Completion(self.request_id, "".join(e.text for e in events),
                          [t for e in events for t in e.token_ids], last.finish_reason or "error",
                          len(self.request.prompt_ids), routed, last.error)

    def result(self, timeout: float | None = None) -> Completion:
        return self._collect(list(self.events(timeout)))

    async def aresult(self) -> Completion:
        return self._collect([e async for e in self.aevents()])


class _LockedTokenizer:
    """One tokenizer shared by the HTTP thread (encode) and the scheduler thread (decode): Rust-backed fast
    tokenizers may refuse concurrent use ("Already borrowed"), so calls take turns."""

    def __init__(self, tokenizer):
        self._tokenizer, self._lock = tokenizer, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def decode(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer.decode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class Engine:
    """Continuous-batching generation over one model (see scheduler.py) on a background thread."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        model_name: str = "model",
        model_path: str | None = None,
        pool=None,
        dispatch=None,
        pricing=None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_prefill_tokens: int = 2048,
        on_arrival: Callable[[GenerationRequest], None] | None = None,
    ):
        """on_arrival: called with each accepted request before it is queued (e.g. to pre-warm the expert
        functions a prediction says it will need, Remoe's SPS)."""
        from moeserve.models.adapter import moe_layers

        if max_batch < 1 or max_queue < 0:
            raise MoeServeError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), _LockedTokenizer(tokenizer)
        self.model_name, self.model_path = model_name, model_path
        self.pool, self.dispatch, self.on_arrival = pool, dispatch, on_arrival
        # with weights released by the dispatch, the experts modules no longer tell the expert count
        self.layers = [d.layer for d in dispatch.layers.values()] if dispatch is not None else moe_layers(model)
        self.device = next(model.parameters()).device
        self.metrics = ServingMetrics(
            self._state, [la.index for la in self.layers], self.layers[0].num_experts if self.layers else 0,
            pool=pool, dispatch=dispatch, pricing=pricing, device=self.device)
        self.scheduler = Scheduler(
            model, self.tokenizer, max_batch=max_batch, max_queue=max_queue, max_prefill_tokens=max_prefill_tokens,
            routing_layers=self.layers, on_finished=self.metrics.observe_finished, on_routed=self._on_routed)
        self._routing_listeners: list[Callable[[torch.Tensor], None]] = [self.metrics.observe_routing]
        self.created = int(time.time())
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def context_limit(self) -> int | None:
        return self.scheduler.context_limit

    @property
    def closing(self) -> bool:
        return self._closing

    def add_routing_listener(self, listener: Callable[[torch.Tensor], None]) -> None:
        """Call `listener(ids)` after every forward, ids: [tokens, moe_layers, top_k] long on the CPU (e.g. a
        MoEless load predictor that adds replicas of predicted stragglers). Runs on the scheduler thread."""
        self._routing_listeners.append(listener)

    def _on_routed(self, ids: torch.Tensor) -> None:
        for listener in self._routing_listeners:
            try:
                listener(ids)
            except Exception:  # an observer must never fail the requests it observes
                log.exception("routing listener %r failed", listener)

    def _state(self) -> dict:
        waiting, running = self.scheduler.pending()
        return {"waiting": waiting, "running": running, "busy_s": self.scheduler.busy_s}

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moeserve-scheduler", daemon=True)
            self._thread.start()
            log.info("engine started: %s on %s, max batch %d, max queue %d", self.model_name, self.device,
                     self.scheduler.max_batch, self.scheduler.max_queue)
        return self

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self.scheduler.has_work():
                    if self._closing:
                        self.scheduler.close()
                        return
                    self._wake.wait(timeout=0.5)
            try:
                self.scheduler.step()
            except Exception:  # never leave accepted requests hanging on a dead thread
                log.exception("scheduler step failed")

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, finish every accepted one first. Then stop the pool (if any)."""
        if self._closing and self._thread is None:
            return
        self._closing = True
        if not drain:
            for live in list(self.scheduler.waiting) + list(self.scheduler.running):
                self.scheduler.cancel(live.request.request_id)
        waiting, running = self.scheduler.pending()
        if waiting or running:
            log.info("draining %d running and %d waiting request(s)", running, waiting)
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.pool is not None:
            log.info("stopping the expert functions")
            self.pool.stop()
        log.info("engine stopped")

    # ----------------------------------------------------------------------------------- requests
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
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
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise MoeServeError("the chat prompt is empty")
        return ids

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
        request = GenerationRequest(ids, params, return_routed_experts, stream_text)
        if self.on_arrival is not None:
            self.on_arrival(request)
        handle = RequestHandle(request, loop)
        self.scheduler.add(request, handle.put)
        with self._wake:
            self._wake.notify()
        return handle

    def generate(self, prompt: str | list[int], params: SamplingParams, **kwargs) -> Completion:
        """Submit and wait (the engine must be started)."""
        return self.submit(prompt, params, stream_text=False, **kwargs).result()

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_model_dir(cls, spec: str = "demo", *, plan: str | None = None, device: str = "auto",
                       pricing: str | None = None, **kwargs) -> Engine:
        """Load `spec` (a model directory or "demo"), apply the plan's placement, and build an engine.

        pricing: profile names or files, comma-separated (one CPU and one GPU offering, see planning/pricing.py).
        """
        from moeserve.models.adapter import require_moe_layers
        from moeserve.models.loading import load_model, load_tokenizer, resolve_device, resolve_model_path

        path = resolve_model_path(spec)
        dev = resolve_device(device)
        log.info("loading %s on %s", path, dev)
        model = load_model(path, device=dev)
        tokenizer = load_tokenizer(path)
        layers = require_moe_layers(model, str(spec))
        placement = placement_from_plan(plan) if plan else ExpertPlacement.all_local(
            [la.index for la in layers], layers[0].num_experts)
        pool = dispatch = None
        remote = sum(len(placement.remote_experts(la.index)) for la in layers)
        if remote:
            from moeserve.serving.dispatch import install_dispatch
            from moeserve.serving.expert_pool import ExpertPool

            log.info("plan %s: %d remote experts in %d functions", plan, remote, len(placement.functions))
            pool = ExpertPool.from_model(model, str(path), placement).start()
            log.info("expert functions started: %d", len(placement.functions))
            dispatch = install_dispatch(model, placement, pool, release_remote_weights=True)
        else:
            log.info("all experts local%s", f" (plan {plan})" if plan else "")
        prices = None
        if pricing:
            from moeserve.planning.pricing import load_pricing

            prices = load_pricing(*pricing.split(","))
        name = "demo" if str(spec) == "demo" else Path(path).name
        return cls(model, tokenizer, model_name=name, model_path=str(path), pool=pool, dispatch=dispatch,
                   pricing=prices, **kwargs)


def placement_from_plan(path: str | Path) -> ExpertPlacement:
    """The placement a plan file asks for (hook: the plan schema owner may refine how plans map here)."""
    from moeserve.plan_format import load_plan

    return load_plan(path).placement()
