"""MoEless while serving: a straggler's replica is added, takes traffic with unchanged tokens, and retires."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeserve.experts.dispatch import install_dispatch
from moeserve.experts.process_backend import ProcessBackend
from moeserve.experts.replica_scaling import ReplicaScaler, straggler_changes
from moeserve.models.adapter import moe_layers
from moeserve.models.loading import load_model
from moeserve.plan.placement import ExpertFunction, ExpertPlacement

pytestmark = pytest.mark.usefixtures("one_thread")


def test_straggler_changes_only_remote_and_under_the_cap():
    loads = np.array([[100.0, 1, 1, 1], [1, 1, 1, 100]])
    remote = np.array([[True, True, False, False], [False, False, False, False]])
    copies = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    assert straggler_changes(loads, remote, copies, 1.5, 2).tolist() == [[True, False, False, False],
                                                                         [False, False, False, False]]
    assert not straggler_changes(loads, remote, copies + 1, 1.5, 2).any()  # already at max copies
    assert not straggler_changes(np.zeros_like(loads), remote, copies, 1.5, 2).any()


def test_replica_added_used_and_retired(tiny_model_dirs, reference):
    model_dir = tiny_model_dirs["qwen3_moe"]
    model = load_model(model_dir)
    layers = moe_layers(model)
    prompt = [5, 9, 30, 31, 7, 12, 40]
    expected = reference(model, prompt, 8)
    e = layers[0].num_experts
    placement = ExpertPlacement({la.index: tuple(range(e // 2)) for la in layers},
                                tuple(ExpertFunction(f"L{la.index}-r0", la.index, tuple(range(e // 2, e)))
                                      for la in layers))
    from moeserve.traces.capture import RoutingCapture

    with RoutingCapture(model, layers) as cap, torch.inference_mode():
        model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       do_sample=False, max_new_tokens=8, pad_token_id=0)
    used = [torch.cat([c.ids[pos].reshape(-1) for c in cap.calls]) for pos in range(len(layers))]
    hot = [int(torch.bincount(u[u >= e // 2], minlength=e).argmax()) for u in used]  # most used remote expert
    pool = ProcessBackend.from_model(model, str(model_dir), placement).start()
    handle = install_dispatch(model, placement, pool)
    try:
        scaler = ReplicaScaler(handle, pool, threshold=1.5, max_copies=2, retire_after=2)
        ids = np.zeros((64, len(layers), layers[0].top_k), dtype=np.int64)
        ids[:, :, 0] = hot  # that expert takes most of the observed tokens of its layer
        ids[:, :, 1:] = np.arange(layers[0].top_k - 1)
        scaler.observe(ids)
        scaler.step()
        added = [fid for kind, fid in scaler.events if kind == "add"]
        assert len(added) == len(layers) and all(fid.endswith(("-x1", "-x2")) for fid in added)
        pool.prewarm(added, wait=True)
        calls_before = {fid: pool.functions[fid].counters.calls for fid in added}
        for _ in range(2):
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     do_sample=False, max_new_tokens=8, pad_token_id=0)
            assert out[0, len(prompt):].tolist() == expected
        assert all(pool.functions[fid].counters.calls > calls_before[fid] for fid in added), "replicas unused"
        assert scaler.step() is None and not [k for k, _ in scaler.events if k == "retire"]  # 1 quiet window
        scaler.step()  # a second window without the straggler: retire
        assert sorted(fid for kind, fid in scaler.events if kind == "retire") == sorted(added)
        assert all(fid not in pool.functions for fid in added)
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=8, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == expected
    finally:
        handle.remove()
        pool.stop()
