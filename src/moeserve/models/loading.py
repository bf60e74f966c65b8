"""Find and load a model: a local Hugging Face directory, the bundled `demo` checkpoint or a shipped model
card (config only, models/cards.py).

Weights are loaded from safetensors only (never pickle) and remote code stays off unless asked for.
Nothing here touches the network: every load is `local_files_only`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from moeserve.errors import MoeServeError
from moeserve.models.cards import card_dir, card_names, is_card_name, looks_like_name

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """`demo`, a shipped card name (`qwen3-30b-a3b`) or a local directory holding config.json -> that
    directory. A local directory wins over a card of the same name."""
    path = Path(spec).expanduser()
    if str(spec) == "demo":
        path = DEMO_MODEL_DIR
        if not (path / "config.json").is_file():
            raise MoeServeError(f"the bundled demo model is missing from {path} (broken install?)")
        return path
    if not path.exists() and is_card_name(str(spec)):
        return card_dir(str(spec))
    if not path.exists():
        if looks_like_name(str(spec)):
            raise MoeServeError(f"unknown model {str(spec)!r}: not a directory, 'demo' or a shipped model card "
                                f"({', '.join(card_names())})")
        raise MoeServeError(f"model directory not found: {path} (give a local Hugging Face directory or 'demo')")
    if not path.is_dir():
        raise MoeServeError(f"model must be a directory with config.json, got a file: {path}")
    if not (path / "config.json").is_file():
        raise MoeServeError(f"no config.json in {path}: not a Hugging Face model directory")
    return path


def load_config(spec: str | os.PathLike, trust_remote_code: bool = False):
    """The model's `PretrainedConfig`, read offline."""

    path = resolve_model_path(spec)
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise MoeServeError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if "auto_map" in raw and not trust_remote_code and "model_type" not in raw:
        raise MoeServeError(f"{path} needs remote code; pass --trust-remote-code if you trust it")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # unknown model_type, remote code refused, ...
        raise MoeServeError(f"cannot read the config in {path}: {str(exc).splitlines()[0]}") from None


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MoeServeError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise MoeServeError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def load_model(
    spec: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    experts_implementation: str | None = None,
):
    """Load a causal LM for inference (eval mode) from safetensors weights, offline.

    `dtype="auto"` keeps the checkpoint's dtype, except that half precision on the CPU becomes float32
    (CPU kernels for fp16/bf16 are slow and less exact).
    """

    hf_logging.disable_progress_bar()  # moeserve draws its own progress; keep stderr to one line per event
    path = resolve_model_path(spec)
    config = load_config(path, trust_remote_code=trust_remote_code)
    if not _has_safetensors(path):
        raise MoeServeError(f"no .safetensors weights in {path}: moeserve loads safetensors only (never pickle)")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if dtype == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        saved = getattr(torch, saved) if isinstance(saved, str) else saved
        dtype = torch.float32 if device.type == "cpu" and saved in (torch.float16, torch.bfloat16) else saved
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except SafetensorError as exc:
        raise MoeServeError(f"{path}: unreadable safetensors weights (truncated or corrupt?): {exc}") from None
    return model.to(device).eval()


def load_tokenizer(spec: str | os.PathLike, trust_remote_code: bool = False):
    """The model's tokenizer, read offline."""

    path = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MoeServeError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None


def load_input_embeddings(spec: str | os.PathLike):
    """The input-embedding matrix [vocab, hidden] as float32 numpy, read from safetensors alone
    (memory-mapped; the rest of the model is not loaded)."""

    path = resolve_model_path(spec)
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)
                if key is not None:
                    return f.get_tensor(key).float().numpy().astype(np.float32)
        except SafetensorError as exc:
            raise MoeServeError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from None
    raise MoeServeError(f"no input-embedding tensor (*embed_tokens.weight) in {path}")


_SAMPLES_PER_FILE = 8
_SAMPLE_BYTES = 1 << 16


def checkpoint_fingerprint(spec: str | os.PathLike) -> str | None:
    """A cheap identity of a checkpoint's weights: sha256 over every safetensors file's name, size and
    header (tensor names, dtypes, shapes, offsets) and 8 evenly spaced 64 KiB samples of its data.
    Two different trainings of one architecture differ in their samples; None for a directory with a
    config and no weights (a model card). Reads at most ~0.5 MiB per file, whatever the model's size."""

    path = resolve_model_path(spec)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoeServeError(f"{file}: not a safetensors file (truncated header)")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise MoeServeError(f"{file}: truncated or corrupt safetensors header")
            digest.update(f.read(header_len))
            start = 8 + header_len
            span = max(size - start - _SAMPLE_BYTES, 0)
            for i in range(_SAMPLES_PER_FILE):
                f.seek(start + span * i // max(_SAMPLES_PER_FILE - 1, 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()
