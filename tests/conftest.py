from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A private temporary directory for this run and every process it starts (servers, expert functions): what
# is left in it at the end was left by moeserve (see no_temp_files_left_behind), not by another run.
_TMP = Path(tempfile.mkdtemp(prefix="moeserve-tests-"))
os.environ["TMPDIR"] = str(_TMP)
tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def _moeserve_leftovers() -> set[str]:
    """moeserve's files in this run's temporary directory (not pytest's or torch's caches) and its
    shared-memory segments."""
    found = {str(p) for p in _TMP.glob("moeserve*")}
    shm = Path("/dev/shm")
    if shm.is_dir():
        found |= {str(p) for p in shm.glob(f"moeserve_{os.getpid()}_*")}
    return found


@pytest.fixture(scope="session", autouse=True)
def no_temp_files_left_behind():
    """The suite (and everything it runs: servers, planners, expert functions) leaves no temporary file."""
    before = _moeserve_leftovers()
    yield
    left = _moeserve_leftovers() - before
    assert not left, f"temporary files left behind: {sorted(left)[:5]}"
    shutil.rmtree(_TMP, ignore_errors=True)


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


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: plain `generate(do_sample=False)` of one prompt, new tokens only."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared, loaded machine: one intra-op thread avoids OpenMP barrier waits that make
    each forward orders of magnitude slower; restored afterwards for other tests. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def reference():
    return greedy_generate


@pytest.fixture(scope="session")
def loaded(tiny_model_dirs):
    """family -> (model, tokenizer), loaded from the saved tiny checkpoints like `moeserve serve` does."""
    from moeserve.models.loading import load_model, load_tokenizer

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = (load_model(tiny_model_dirs[family]), load_tokenizer(tiny_model_dirs[family]))
        return cache[family]

    return get
