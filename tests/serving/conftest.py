from __future__ import annotations

import pytest
import torch


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
