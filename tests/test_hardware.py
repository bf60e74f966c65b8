"""Hardware profile: fits, schema, file handling, measurement, transport, reference estimates."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time

import numpy as np
import psutil
import pytest
import torch
import yaml

from moeserve.errors import MoeServeError
from moeserve.hardware import available_hardware_profiles, fit_curve, load_hardware_profile, save_profile
from moeserve.hardware.copy_bandwidth import latency_and_bandwidth
from moeserve.hardware.expert import expert_weights, measure_expert_latency, swiglu_expert
from moeserve.hardware.fit import isotonic_increasing, piecewise_eval
from moeserve.hardware.machine import cpu_model
from moeserve.hardware.measure import (
    CpuTimes,
    cpu_time_snapshot,
    default_thread_counts,
    measure_hardware,
    measurement_conditions,
    other_cpus,
)
from moeserve.hardware.nonexpert import null_experts
from moeserve.hardware.reference import (
    A100_SXM4_80GB,
    COMPUTE_EFFICIENCY,
    EXPERT_OPS,
    H100_SXM5_80GB,
    LAUNCH_S,
    reference_profile,
    roofline_expert_latency_s,
)
from moeserve.hardware.schema import (
    CopyCurve,
    ExpertCurve,
    ExpertSection,
    HardwareProfile,
    MachineInfo,
    NonExpertCurve,
    NonExpertSection,
)
from moeserve.hardware.transport import EchoPeer, measure_transport
from tiny_models import tiny_model

TOKENS = [1, 2, 4, 8, 16, 32, 50, 64, 128, 256]


# ---- fits -------------------------------------------------------------------------------------------

def test_fit_recovers_a_line_exactly():
    x = np.array(TOKENS, dtype=float)
    fit = fit_curve(x, 2e-5 + 3e-7 * x)
    assert fit.a == pytest.approx(2e-5, rel=1e-9)
    assert fit.b == pytest.approx(3e-7, rel=1e-9)
    assert fit.max_rel_error < 1e-9 and fit.linear_max_rel_error < 1e-9
    assert fit(100) == pytest.approx(2e-5 + 3e-7 * 100, rel=1e-9)
    assert fit(1000) == pytest.approx(2e-5 + 3e-7 * 1000, rel=1e-9)  # extrapolates with the last slope


def test_piecewise_fit_recovers_a_kink_the_line_cannot():
    x = np.array(TOKENS, dtype=float)
    truth = lambda t: np.maximum(5e-5, 1e-6 * np.asarray(t, dtype=float))  # noqa: E731
    fit = fit_curve(x, truth(x))
    assert 50.0 in fit.knots_x
    assert fit.max_rel_error < 1e-9
    assert fit.linear_max_rel_error > 0.2  # a straight line misses the flat launch-bound start
    for t in (3, 40, 100, 200, 400):
        assert fit(t) == pytest.approx(float(truth(t)), rel=1e-9)


def test_noisy_fit_is_monotone_and_close():
    rng = np.random.default_rng(0)
    x = np.array(TOKENS * 3, dtype=float)
    y = (1e-5 + 2e-7 * x) * (1 + 0.03 * rng.standard_normal(x.size))
    fit = fit_curve(x, y)
    assert np.all(np.diff(fit.knots_y) >= 0)
    assert fit.a == pytest.approx(1e-5, rel=0.1)
    assert fit.b == pytest.approx(2e-7, rel=0.1)
    grid = np.linspace(1, 256, 50)
    assert np.max(np.abs(fit(grid) / (1e-5 + 2e-7 * grid) - 1)) < 0.1
    assert np.all(np.diff(fit(grid)) >= 0)


def test_isotonic_matches_pooled_means():
    assert isotonic_increasing([3.0, 1.0, 2.0]).tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert isotonic_increasing([1.0, 3.0, 2.0, 4.0]).tolist() == pytest.approx([1.0, 2.5, 2.5, 4.0])
    rng = np.random.default_rng(1)
    y = rng.standard_normal(30)
    iso = isotonic_increasing(y)
    assert np.all(np.diff(iso) >= -1e-12) and iso.sum() == pytest.approx(y.sum())


def test_piecewise_eval_clamps_and_extrapolates():
    kx, ky = np.array([1.0, 10.0]), np.array([1.0, 10.0])
    assert piecewise_eval(kx, ky, [0.0, 5.0, 20.0]).tolist() == pytest.approx([0.0, 5.0, 20.0])
    assert piecewise_eval(kx, ky, -5.0) == 0.0  # never negative


# ---- schema, files ----------------------------------------------------------------------------------

def _synthetic_profile(name="synthetic") -> HardwareProfile:
    tokens = (1, 4, 16, 64, 256)

    def expert_curve(threads, scale):
        secs = tuple(scale * (1e-5 + 1e-7 * t) for t in tokens)
        return ExpertCurve("cpu", threads, "float32", tokens, secs, fit_curve(tokens, secs))

    batches = (1, 2, 4, 8)
    decode = tuple(1e-4 + 1e-6 * b for b in batches)
    prefill = tuple(1e-4 + 1e-5 * t for t in tokens)
    return HardwareProfile(
        name=name,
        source="synthetic numbers for tests",
        notes="not a machine",
        machine=MachineInfo(cpu_model="Test CPU", cpu_cores=4, ram_bytes=1 << 30),
        expert=ExpertSection(64, 32, (expert_curve(1, 2.0), expert_curve(4, 1.0))),
        non_expert=NonExpertSection("TinyModel", 2, (
            NonExpertCurve("prefill", "cpu", 4, "float32", tokens, prefill, fit_curve(tokens, prefill)),
            NonExpertCurve("decode", "cpu", 4, "float32", batches, decode, fit_curve(batches, decode), context_len=64),
        )),
        copy=(CopyCurve("h2d", True, (1 << 20, 1 << 24), (1e-4, 1e-3), 1e-5, 2e10),),
        transport=reference_profile("a100-80gb", 64, 32).transport,
    )


def test_schema_round_trip(tmp_path):
    profile = _synthetic_profile()
    path = tmp_path / "p.yaml"
    save_profile(profile, path)
    assert load_hardware_profile(path) == profile
    ref = reference_profile("h100-sxm", 192, 96)
    save_profile(ref, tmp_path / "ref.yaml")
    assert load_hardware_profile(tmp_path / "ref.yaml") == ref
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.tmp"))  # atomic: no leftovers


def test_profile_lookups():
    p = _synthetic_profile()
    assert p.expert_latency_s(16, threads=1) == pytest.approx(2 * (1e-5 + 1.6e-6), rel=1e-6)
    assert p.expert_latency_s(16) == pytest.approx(1e-5 + 1.6e-6, rel=1e-6)  # most threads by default
    assert p.expert_curve(threads=3).threads == 4  # nearest measured count
    assert p.expert_latency_s(0) == 0.0
    assert p.expert_latency_s(np.array([0, 64])).tolist() == pytest.approx([0.0, 1e-5 + 6.4e-6], rel=1e-6)
    assert p.non_expert_latency_s("decode", 4) == pytest.approx(1e-4 + 4e-6, rel=1e-6)
    assert p.non_expert_latency_s("prefill", 16) == pytest.approx(1e-4 + 1.6e-4, rel=1e-6)
    assert p.copy_s(1 << 20) == pytest.approx(1e-5 + (1 << 20) / 2e10)
    assert p.transport_round_trip_s(1000) > 0
    with pytest.raises(MoeServeError, match="no expert latency"):
        p.expert_latency_s(4, device="cuda")
    with pytest.raises(MoeServeError, match="phase"):
        p.non_expert_latency_s("train", 4)
    with pytest.raises(MoeServeError, match="d2h"):
        p.copy_s(10, direction="d2h")
    with pytest.raises(MoeServeError, match="non-expert"):
        reference_profile("a100-80gb", 64, 32).non_expert_latency_s("decode", 1)


def _write(tmp_path, data, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("source"), "missing field 'source'"),
    (lambda d: d["expert"].pop("hidden_size"), "expert: missing field 'hidden_size'"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.pop("schema_version"), "schema_version"),
    (lambda d: d["expert"].update(hidden_size="big"), "expert.hidden_size: expected an integer"),
    (lambda d: d["expert"]["curves"][0].update(seconds=[1e-5]), "as many x values as seconds"),
    (lambda d: d["expert"]["curves"][0].update(device="tpu"), "device must be cpu or cuda"),
    (lambda d: d["expert"]["curves"][0]["fit"].pop("a"), "curves\\[0\\].fit: missing field 'a'"),
    (lambda d: d.update(colour="blue"), "unknown field"),
    (lambda d: d["machine"].update(ram_bytes=None), "machine.ram_bytes: expected an integer"),
])
def test_malformed_files_raise_a_clear_error(tmp_path, mutate, message):
    data = _synthetic_profile().to_dict()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(MoeServeError, match=message) as info:
        load_hardware_profile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_or_missing_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MoeServeError, match="mapping"):
        load_hardware_profile(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(MoeServeError, match="not valid YAML"):
        load_hardware_profile(tmp_path / "broken.yaml")
    with pytest.raises(MoeServeError, match="not found"):
        load_hardware_profile(tmp_path / "nothing.yaml")
    with pytest.raises(MoeServeError, match="unknown hardware profile 'tpu-v9'.*a100-80gb"):
        load_hardware_profile("tpu-v9")


def test_shipped_profiles_load_by_name():
    names = available_hardware_profiles()
    assert {"a100-80gb", "h100-sxm", "cpu-2core"} <= set(names)
    for name in names:
        profile = load_hardware_profile(name)
        assert profile.name == name and profile.source
    a100, h100 = load_hardware_profile("a100-80gb"), load_hardware_profile("h100-sxm")
    assert a100.datasheet.gpu_memory_bandwidth_bytes_per_s == 2.039e12
    assert all(c.method == "estimated" for c in a100.expert.curves)
    # the shipped files are what the code derives from the datasheets (regenerate with the script)
    assert a100 == reference_profile("a100-80gb", a100.expert.hidden_size, a100.expert.intermediate_size)
    assert h100 == reference_profile("h100-sxm", h100.expert.hidden_size, h100.expert.intermediate_size)
    cpu = load_hardware_profile("cpu-2core")
    assert cpu.expert_latency_s(256) > cpu.expert_latency_s(1)
    assert {c.threads for c in cpu.expert.curves} == {1, 2}


# ---- reference estimates ----------------------------------------------------------------------------

def test_roofline_is_launch_bound_small_and_compute_bound_large():
    small = roofline_expert_latency_s(1, 192, 96, "bfloat16", A100_SXM4_80GB)
    assert small == pytest.approx(EXPERT_OPS * LAUNCH_S)
    tokens, h, i = 1 << 20, 4096, 14336
    big = roofline_expert_latency_s(tokens, h, i, "bfloat16", A100_SXM4_80GB)
    assert big == pytest.approx(6 * h * i * tokens / (312e12 * COMPUTE_EFFICIENCY), rel=0.01)
    t = np.array([1, 64, 4096, 65536])
    assert np.all(roofline_expert_latency_s(t[2:], h, i, "bfloat16", H100_SXM5_80GB)
                  < roofline_expert_latency_s(t[2:], h, i, "bfloat16", A100_SXM4_80GB))
    assert np.all(np.diff(roofline_expert_latency_s(t, h, i, "float32", A100_SXM4_80GB)) >= 0)


def test_latency_and_bandwidth_recovers_a_line():
    sizes = [1 << 16, 1 << 20, 1 << 24]
    latency, bandwidth = latency_and_bandwidth(sizes, [1e-5 + n / 25e9 for n in sizes])
    assert latency == pytest.approx(1e-5, rel=1e-6) and bandwidth == pytest.approx(25e9, rel=1e-6)
    assert latency_and_bandwidth([1000], [1e-6]) == (0.0, pytest.approx(1e9))


# ---- measurement ------------------------------------------------------------------------------------

def test_swiglu_expert_matches_its_definition():
    gate, up, down = expert_weights(8, 6, torch.float64, torch.device("cpu"))
    x = torch.randn(5, 8, dtype=torch.float64)
    ref = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(swiglu_expert(x, gate, up, down), ref)


def test_expert_latency_grows_with_tokens():
    before = torch.get_num_threads()
    one, many = measure_expert_latency(128, 256, [1, 256], threads=1, repeats=5, warmup=1)
    assert 0 < one.best_s < many.best_s
    assert one.best_s <= one.median_s <= one.p90_s
    assert torch.get_num_threads() == before


def test_default_thread_counts():
    assert default_thread_counts(2) == [1, 2]
    assert default_thread_counts(6) == [1, 2, 3, 4, 5, 6]
    assert default_thread_counts(48) == [1, 2, 4, 8, 16, 32, 48]


def test_null_experts_remove_exactly_the_routed_experts():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model.get_experts_implementation()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        with null_experts(model):
            nulled = model(input_ids=ids).logits
        restored = model(input_ids=ids).logits
        for layer in model.model.layers:  # the same model with every routed expert's output forced to 0
            layer.mlp.experts.down_proj.zero_()
        zeroed = model(input_ids=ids).logits
    torch.testing.assert_close(nulled, zeroed)
    torch.testing.assert_close(restored, original)
    assert not torch.allclose(original, zeroed)
    assert model.get_experts_implementation() == before


def test_measure_hardware_on_a_tiny_model():
    model = tiny_model("qwen3_moe")
    steps = []
    p = measure_hardware(32, 16, model=model, thread_counts=[1], token_counts=[1, 64], repeats=3,
                         prefill_lengths=(4, 16), decode_batches=(1, 2), decode_context=8,
                         progress=lambda s, i, n: steps.append((s, i, n)), name="tiny")
    assert [i for _, i, _ in steps] == list(range(1, len(steps) + 1)) and steps[-1][1] == steps[-1][2]
    assert [(c.device, c.threads, c.tokens) for c in p.expert.curves] == [("cpu", 1, (1, 64))]
    assert all(s > 0 for c in p.expert.curves for s in c.seconds)
    decode = next(c for c in p.non_expert.curves if c.phase == "decode")
    assert p.non_expert.num_layers == 2 and decode.x == (1, 2) and decode.context_len == 8
    assert p.non_expert_latency_s("prefill", 16) > 0
    assert p.transport.nbytes == (32 * 4, 64 * 32 * 4)
    layers = model.model.layers
    expert_params = sum(p.numel() for layer in layers for p in layer.mlp.experts.parameters())
    assert p.memory.all_experts_bytes == expert_params * 4
    assert p.memory.expert_bytes == expert_params * 4 // (len(layers) * 8)
    assert p.memory.non_expert_bytes == sum(p.numel() for p in model.parameters()) * 4 - expert_params * 4
    assert p.memory.process_rss_bytes > 0
    assert model.get_experts_implementation() == {"": "grouped_mm"}
    assert p.copy == () or torch.cuda.is_available()


def test_measurement_conditions_flag_load_and_spread():
    from moeserve.hardware.measure import measurement_conditions

    quiet = measurement_conditions(2, 1, 0.3, 1.2, [0.02, 0.05, 0.1])
    assert not quiet.unreliable and quiet.reasons == ()
    loaded = measurement_conditions(2, 2, 3.1, 4.0, [0.05])  # a job on both CPUs before we started
    assert loaded.unreliable and "loaded by other work" in loaded.reasons[0]
    noisy = measurement_conditions(8, 2, 0.0, 0.0, [0.9, 1.4, 0.2])
    assert noisy.unreliable and "spread" in noisy.reasons[0] and noisy.max_spread == 1.4


def _spin(stop):
    while not stop.is_set():
        pass


def test_a_profile_measured_beside_another_job_is_flagged():
    """The same measurement twice: alone, then with two processes spinning on the machine's CPUs. The second
    is flagged unreliable (other processes' CPU time, or its repeats spread), whatever the first says about how quiet this machine is."""
    kwargs = dict(thread_counts=[1], token_counts=[16, 64, 128], repeats=15, name="t",
                  measure_transport_round_trip=False)
    alone = measure_hardware(64, 256, **kwargs)
    stop = multiprocessing.get_context("spawn").Event()
    hogs = [multiprocessing.get_context("spawn").Process(target=_spin, args=(stop,)) for _ in range(os.cpu_count() or 2)]
    for h in hogs:
        h.start()
    try:
        busy = measure_hardware(64, 256, **kwargs)
    finally:
        stop.set()
        for h in hogs:
            h.join(10)
    assert busy.conditions.unreliable, busy.conditions
    if busy.conditions.other_cpus is not None:  # a direct reading: the spinning processes' CPU time
        assert busy.conditions.other_cpus > max(0.5, alone.conditions.other_cpus), (alone.conditions, busy.conditions)
    assert all(len(c.spread) == len(c.tokens) for c in busy.expert.curves)


def test_other_processes_cpu_time_is_the_machine_s_minus_our_own():
    before, after = CpuTimes(10.0, 100.0, 5.0), CpuTimes(12.0, 104.0, 6.0)
    assert other_cpus(before, after) == pytest.approx(1.5)  # 4 s busy, 1 s ours, over 2 s
    assert other_cpus(before, CpuTimes(12.0, None, 6.0)) is None
    quiet = measurement_conditions(2, 1, 0.1, 0.9, [0.01], other_cpus=0.1)
    loaded = measurement_conditions(2, 1, 0.1, 0.9, [0.01], other_cpus=1.6)
    assert not quiet.unreliable and loaded.unreliable and "other processes" in loaded.reasons[0]
    # a load average still high from our own capture a minute ago: the direct reading says the machine is quiet
    after_capture = measurement_conditions(2, 2, 1.9, 2.1, [0.01], other_cpus=0.05)
    assert not after_capture.unreliable, after_capture.reasons


def _spin_for(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_finished_child_s_cpu_time_is_our_own():
    """The transport measurement spawns an echo peer: its CPU time is the measurement's, not other work."""
    before = cpu_time_snapshot()
    child = multiprocessing.get_context("spawn").Process(target=_spin_for, args=(0.5,))
    child.start()
    child.join(30)
    after = cpu_time_snapshot()
    assert after.own_s - before.own_s >= 0.4


def test_measure_hardware_rejects_bad_input():
    with pytest.raises(MoeServeError, match="dtype"):
        measure_hardware(8, 8, dtype="int8", token_counts=[1], repeats=1)
    if not torch.cuda.is_available():
        with pytest.raises(MoeServeError, match="CUDA"):
            measure_hardware(8, 8, devices=["cuda"], token_counts=[1], repeats=1)


def test_cpu_model_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor\n")
    assert cpu_model(info) == "AMD EPYC 7763 64-Core Processor"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measurements():
    from moeserve.hardware.copy_bandwidth import measure_copies

    one, many = measure_expert_latency(256, 512, [1, 4096], device="cuda", repeats=5)
    assert 0 < one < many
    copies = measure_copies("cuda", sizes=(1 << 16, 1 << 22), repeats=3)
    assert {(c.direction, c.pinned) for c in copies} == {("h2d", True), ("d2h", True), ("h2d", False), ("d2h", False)}


# ---- transport --------------------------------------------------------------------------------------

def _shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_transport_round_trip_returns_the_same_bytes_and_cleans_up():
    rng = np.random.default_rng(0)
    with EchoPeer(256 * 64 * 4) as peer:
        names, pid = peer.segment_names, peer.pid
        assert set(names) <= _shm_names() and psutil.pid_exists(pid)
        for rows in (1, 7, 256):
            x = rng.standard_normal((rows, 64)).astype(np.float32)
            back = peer.round_trip(x).view(np.float32).reshape(rows, 64)
            assert np.array_equal(back, x)
        with pytest.raises(ValueError, match="exceeds"):
            peer.round_trip(np.zeros(256 * 64 * 4 + 1, dtype=np.uint8))
    assert not set(names) & _shm_names()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert multiprocessing.active_children() == []


def test_transport_cleans_up_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with EchoPeer(1024) as peer:
            names, pid = peer.segment_names, peer.pid
            raise RuntimeError("boom")
    assert not set(names) & _shm_names()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_measure_transport():
    before = _shm_names()
    timing = measure_transport([4096, 64], repeats=5, warmup=1)
    assert timing.nbytes == (64, 4096) and all(s > 0 for s in timing.seconds)
    assert _shm_names() <= before and multiprocessing.active_children() == []


def test_profile_dataclasses_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _synthetic_profile().name = "x"
