from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Saved tiny models of every family (and a dense one), as Hugging Face directories."""
    import transformers as tf

    from tiny_models import DENSE_CONFIG, TINY_CONFIGS, save_tiny_model, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for family in TINY_CONFIGS:
        save_tiny_model(family, root / family)
        save_tiny_tokenizer(root / family)
        dirs[family] = root / family
    tf.AutoModelForCausalLM.from_config(DENSE_CONFIG()).save_pretrained(root / "dense")
    save_tiny_tokenizer(root / "dense")
    dirs["dense"] = root / "dense"
    return dirs
