"""Latency of one routed expert (a SwiGLU FFN) as a function of the tokens routed to it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from moeserve.hardware.timing import Timing, time_calls, torch_threads


def swiglu_expert(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """y = down(silu(gate x) * up x). x: [T, H], gate/up: [I, H], down: [H, I] -> [T, H]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def expert_weights(hidden_size: int, intermediate_size: int, dtype: torch.dtype, device: torch.device,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (gate [I, H], up [I, H], down [H, I]) with a typical init scale."""
    g = torch.Generator().manual_seed(seed)
    scale_in, scale_out = hidden_size ** -0.5, intermediate_size ** -0.5
    gate = torch.randn(intermediate_size, hidden_size, generator=g) * scale_in
    up = torch.randn(intermediate_size, hidden_size, generator=g) * scale_in
    down = torch.randn(hidden_size, intermediate_size, generator=g) * scale_out
    return tuple(w.to(device=device, dtype=dtype) for w in (gate, up, down))


def measure_expert_latency(hidden_size: int, intermediate_size: int, token_counts: Sequence[int],
                           dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                           threads: int | None = None, repeats: int = 20, warmup: int = 3,
                           progress: Callable[[int], None] | None = None) -> list[Timing]:
    """Timing of one expert forward for each count in `token_counts` ([N] -> [N]).

    threads: CPU intra-op threads for the measurement (restored afterwards); ignored on CUDA.
    progress: optional callable(tokens) for each point once it is measured.
    """
    device = torch.device(device)
    gate, up, down = expert_weights(hidden_size, intermediate_size, dtype, device)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(int(t), hidden_size, generator=g).to(device=device, dtype=dtype) for t in token_counts]
    calls = [lambda x=x: swiglu_expert(x, gate, up, down) for x in inputs]
    with torch.inference_mode(), torch_threads(threads if device.type == "cpu" else None):
        seconds = time_calls(calls, device, repeats, warmup)
    if progress is not None:
        for tokens in token_counts:
            progress(int(tokens))
    return seconds
