"""One routed expert: how its weights are laid out, the weights, and its FFN.

Pure torch (no transformers import for the common activations): the expert-function processes use
this module, and a spawned process that imports transformers starts about a second later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

_FAST_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class ExpertLayout:
    """How an experts module stores its fused weights, and the expert's activation.

    activation: a transformers ACT2FN name for gated (GLU) or plain experts, or "gptoss_swiglu"
        (GPT-OSS: clamped gate/up, gate * sigmoid(alpha * gate) * (up + 1)).
    """

    has_gate: bool
    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    activation: str
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights, `nn.Linear` orientation (views into the fused tensors where possible).

    gate: [I, H] or None (ungated experts), up: [I, H], down: [H, I]; biases [I], [I], [H] or None.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def split_gate_up(t: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[2I, ...] -> ([I, ...], [I, ...]): halves, or even/odd rows for interleaved layouts."""
    if concatenated:
        half = t.shape[0] // 2
        return t[:half], t[half:]
    return t[0::2], t[1::2]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name` in transformers' ACT2FN."""
    if name in _FAST_ACTIVATIONS:
        return _FAST_ACTIVATIONS[name]
    from transformers.activations import ACT2FN  # heavy: only for the rare activations

    return ACT2FN[name]


def expert_forward(x: torch.Tensor, w: ExpertWeights, layout: ExpertLayout, act=None) -> torch.Tensor:
    """One expert's FFN: x [T, H] -> [T, H]. Pure: depends only on its arguments (`act`: a cached
    `activation(layout.activation)`, looked up when not given)."""
    if layout.activation == "gptoss_swiglu":
        gate = F.linear(x, w.gate, w.gate_bias).clamp(max=layout.swiglu_limit)
        up = F.linear(x, w.up, w.up_bias).clamp(min=-layout.swiglu_limit, max=layout.swiglu_limit)
        h = (up + 1) * gate * torch.sigmoid(gate * layout.swiglu_alpha)
    else:
        act = act or activation(layout.activation)
        if w.gate is not None:
            h = act(F.linear(x, w.gate, w.gate_bias)) * F.linear(x, w.up, w.up_bias)
        else:
            h = act(F.linear(x, w.up, w.up_bias))
    return F.linear(h, w.down, w.down_bias)


def weighted_expert_sum(x: torch.Tensor, rows: torch.Tensor, experts: np.ndarray, weights: torch.Tensor,
                        expert_weights: dict[int, ExpertWeights], layout: ExpertLayout, act=None) -> torch.Tensor:
    """What an expert function computes for one call (Remoe [IV-A]: the remote part of a layer's MoE sum):
    y [U, H] = sum over pairs p of weights[p] * expert_{experts[p]}(x[rows[p]]).

    x [U, H]; rows [P] int64 into x; experts [P] int, sorted (one FFN per run of equal ids); weights [P]
    in x's dtype. Pure: depends only on its arguments."""
    y = torch.zeros_like(x)
    bounds = np.flatnonzero(np.diff(experts)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(experts)], strict=True):
        if start == stop:
            continue
        r = rows[start:stop]
        out = expert_forward(x[r], expert_weights[int(experts[start])], layout, act)
        y.index_put_((r,), out * weights[start:stop, None], accumulate=True)
    return y
