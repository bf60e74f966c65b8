"""Read one routed expert's weights straight from a model directory's safetensors, without the model.

An expert function loads only its experts: each tensor is memory mapped (`safetensors.safe_open`) and
only the expert's own bytes are copied out (`get_slice(name)[e]` for fused `[E, ...]` tensors).

transformers v5 `save_pretrained` writes the experts in each family's original naming:
- per expert: `<prefix>layers.{l}.<block>.experts.{e}.{gate_proj|up_proj|down_proj}.weight`
  (Qwen, OLMoE, DeepSeek) or `...experts.{e}.{w1|w3|w2}.weight` (Mixtral, Phi-MoE);
- fused, in the module's own storage layout: `<block>.experts.{gate_up_proj,down_proj}[_bias]` (GPT-OSS,
  transposed and interleaved) or Granite's `<block>.{input_linear,output_linear}.weight`.
Fused tensors are cut with the `ExpertLayout` of the loaded experts module (`moeserve.models.adapter`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from moeserve.errors import MoeServeError
from moeserve.models.expert_ffn import ExpertLayout, ExpertWeights, split_gate_up

_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_PER_EXPERT = re.compile(r"^\w+\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<kind>weight|bias)$")
_FUSED = re.compile(r"^\w+\.experts\.(?P<name>gate_up_proj|up_proj|down_proj)(?P<bias>_bias)?(?:\.weight)?$")
_GRANITE = re.compile(r"^\w+\.(?P<name>input_linear|output_linear)\.weight$")
_QUANTIZED = re.compile(r"^\w+\.experts\.\w+_(blocks|scales)$")

_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_GRANITE_NAMES = {"input_linear": "gate_up_proj", "output_linear": "down_proj"}


@dataclass
class _LayerKeys:
    """Where one layer's routed experts live: per-expert keys or fused `[E, ...]` keys."""

    per_expert: dict[tuple[int, str, str], str] = field(default_factory=dict)  # (expert, role, kind) -> key
    fused: dict[str, str] = field(default_factory=dict)  # gate_up_proj[_bias] / up_proj / down_proj[_bias] -> key


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (sharded or not)."""

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {key: model_dir / name for key, name in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise MoeServeError(f"no .safetensors weights in {model_dir}")
    where = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            where.update({key: path for key in f.keys()})
    return where


def _index_layers(keys) -> dict[int, _LayerKeys]:
    layers: dict[int, _LayerKeys] = {}
    for key in keys:
        m = _LAYER_KEY.match(key)
        if m is None:
            continue
        layer, rest = int(m["layer"]), m["rest"]
        if _QUANTIZED.match(rest):
            raise MoeServeError(f"{key}: quantized (MXFP4) expert weights are not supported; use a bf16/fp32 checkpoint")
        if (pe := _PER_EXPERT.match(rest)) and pe["proj"] in _ROLES:
            entry = layers.setdefault(layer, _LayerKeys())
            entry.per_expert[(int(pe["expert"]), _ROLES[pe["proj"]], pe["kind"])] = key
        elif fu := _FUSED.match(rest):
            layers.setdefault(layer, _LayerKeys()).fused[fu["name"] + (fu["bias"] or "")] = key
        elif gr := _GRANITE.match(rest):
            layers.setdefault(layer, _LayerKeys()).fused[_GRANITE_NAMES[gr["name"]]] = key
    return layers


class CheckpointExperts:
    """Memory-mapped access to the routed experts of a model directory.

    Holds the safetensors files open (mmap, no tensor data read) until `close()`; use as a context manager.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self._files = _weight_files(self.model_dir)
        self._layers = _index_layers(self._files)
        self._open: dict[Path, object] = {}

    def __enter__(self) -> CheckpointExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._open.clear()  # safe_open handles unmap when dropped

    def layers(self) -> list[int]:
        """Decoder-layer indices that hold routed experts in this checkpoint."""
        return sorted(self._layers)

    def _handle(self, key: str):

        path = self._files[key]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def _tensor(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def _expert_slice(self, key: str, expert: int) -> torch.Tensor:
        fused = self._handle(key).get_slice(key)
        if not 0 <= expert < fused.get_shape()[0]:
            raise MoeServeError(f"{self.model_dir}: expert {expert} is out of range for {key}")
        return fused[expert]

    def read(self, layer: int, expert: int, layout: ExpertLayout, dtype: torch.dtype | None = None) -> ExpertWeights:
        """Expert `expert` of decoder layer `layer`, `nn.Linear` orientation, contiguous, cast to `dtype`.

        Returns gate [I, H] (None when ungated), up [I, H], down [H, I] and biases [I], [I], [H] or None.
        """
        return self._assemble(layer, expert, layout, dtype, self._tensor, self._expert_slice)

    def _keys_of(self, layer: int) -> _LayerKeys:
        keys = self._layers.get(layer)
        if keys is None:
            raise MoeServeError(f"{self.model_dir}: no routed experts for layer {layer} in the checkpoint")
        return keys

    def _assemble(self, layer: int, expert: int, layout: ExpertLayout, dtype: torch.dtype | None,
                  tensor, expert_slice) -> ExpertWeights:
        """The expert's weights from `tensor(key)` (a whole per-expert tensor) and `expert_slice(key, e)`
        (expert e's row of a fused [E, ...] tensor): the one place the families' layouts are undone."""
        keys = self._keys_of(layer)
        if keys.per_expert:
            parts = self._read_per_expert(keys, layer, expert, tensor)
        else:
            parts = self._read_fused(keys, layer, expert, layout, expert_slice)
        return ExpertWeights(**{
            name: None if t is None else t.to(dtype or t.dtype).contiguous() for name, t in parts.items()
        })

    def expert_keys(self, layer: int, expert: int) -> tuple[list[str], list[str]]:
        """The checkpoint tensors holding one expert: (per-expert keys read whole, fused keys sliced at e)."""
        keys = self._keys_of(layer)
        if keys.per_expert:
            return [k for (e, _, _), k in keys.per_expert.items() if e == expert], []
        return [], list(keys.fused.values())

    def _read_per_expert(self, keys: _LayerKeys, layer: int, expert: int, tensor) -> dict[str, torch.Tensor | None]:
        def get(role: str, kind: str) -> torch.Tensor | None:
            key = keys.per_expert.get((expert, role, kind))
            return None if key is None else tensor(key)

        up, down = get("up", "weight"), get("down", "weight")
        if up is None or down is None:
            raise MoeServeError(f"{self.model_dir}: layer {layer} expert {expert} is missing from the checkpoint")
        return dict(gate=get("gate", "weight"), up=up, down=down, gate_bias=get("gate", "bias"),
                    up_bias=get("up", "bias"), down_bias=get("down", "bias"))

    def _read_fused(self, keys: _LayerKeys, layer: int, expert: int, layout: ExpertLayout, expert_slice) -> dict:
        def linear(name: str) -> torch.Tensor:  # one expert's [out, in] matrix
            w = expert_slice(keys.fused[name], expert)
            return w.t() if layout.is_transposed else w

        def bias(name: str) -> torch.Tensor | None:
            key = keys.fused.get(name)
            return None if key is None else expert_slice(key, expert)

        if "down_proj" not in keys.fused:
            raise MoeServeError(f"{self.model_dir}: layer {layer} has no down_proj for its experts")
        down = linear("down_proj")
        if "gate_up_proj" in keys.fused:
            gate, up = split_gate_up(linear("gate_up_proj"), layout.is_concatenated)
            gate_bias, up_bias = None, None
            if (gub := bias("gate_up_proj_bias")) is not None:
                gate_bias, up_bias = split_gate_up(gub, layout.is_concatenated)
            return dict(gate=gate, up=up, down=down, gate_bias=gate_bias, up_bias=up_bias,
                        down_bias=bias("down_proj_bias"))
        return dict(gate=None, up=linear("up_proj"), down=down, gate_bias=None, up_bias=bias("up_proj_bias"),
                    down_bias=bias("down_proj_bias"))


def read_experts(
    model_dir: str | os.PathLike, layer: int, experts: list[int] | tuple[int, ...], layout: ExpertLayout,
    dtype: torch.dtype | None = None,
) -> dict[int, ExpertWeights]:
    """The given experts of one layer, read from the checkpoint and then unmapped: expert id -> weights."""
    with CheckpointExperts(model_dir) as ckpt:
        return {e: ckpt.read(layer, e, layout, dtype) for e in experts}
