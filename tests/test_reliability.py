"""Careless and hostile command lines: no data destroyed, one line and exit 2, nothing left on failure."""

from __future__ import annotations

import shutil
import time

import pytest
import yaml

from cli_run import run_cli


@pytest.fixture(scope="module")
def traced(tiny_model_dirs, tmp_path_factory):
    """A small trace of the tiny Qwen3-MoE and a plan for it (all experts local)."""
    root = tmp_path_factory.mktemp("reliability")
    trace = root / "t.trace"
    r = run_cli("profile", tiny_model_dirs["qwen3_moe"], "--prompts", "builtin:mixed", "--max-prompts", "12",
                "--gen-tokens", "4", "--batch-size", "4", "--out", trace)
    assert r.code == 0, r.err
    return {"trace": trace, "root": root, "model": tiny_model_dirs["qwen3_moe"]}


def _one_line_error(r, code: int = 2) -> str:
    assert r.code == code, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err and "╭" not in r.err, r.err
    return lines[0]


def _victim(root):
    d = root / "victim"
    if d.exists():
        shutil.rmtree(d)
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("keep me")
    return d


def _intact(d) -> bool:
    return (d / "sub" / "f").read_text() == "keep me" and sorted(p.name for p in d.iterdir()) == ["sub"]


def test_every_output_flag_refuses_a_directory_and_keeps_it(traced, tiny_model_dirs, monkeypatch):
    root, model = traced["root"], tiny_model_dirs["qwen3_moe"]
    cases = [
        ("plan", traced["trace"], "--out", "{d}"),
        ("plan", traced["trace"], "--strategy", "moeless", "--out", "{d}"),
        ("profile", model, "--prompts", "builtin:mixed", "--max-prompts", "2", "--out", "{d}"),
        ("profile", model, "--hardware", "--hardware-out", "{d}"),
        ("trace", "import", root / "missing.npy", "--out", "{d}"),
        ("bench", "--url", "http://127.0.0.1:9", "--plot", "{d}"),
    ]
    for case in cases:
        d = _victim(root)
        t0 = time.monotonic()
        line = _one_line_error(run_cli(*[str(a).format(d=d) for a in case]))
        assert "is a directory" in line, (case, line)
        assert time.monotonic() - t0 < 20  # refused before any profiling or measuring
        assert _intact(d), case
    d = _victim(root)
    monkeypatch.chdir(d)
    assert "is a directory" in _one_line_error(run_cli("plan", traced["trace"], "--out", "."))
    assert _intact(d)


def test_finetune_never_replaces_a_foreign_directory(tiny_model_dirs, tmp_path):
    d = _victim(tmp_path)
    for extra in ((), ("--force",)):
        line = _one_line_error(run_cli("finetune-router", tiny_model_dirs["qwen3_moe"], "--steps", "1",
                                       "--out", d, *extra))
        assert "not written by moeserve" in line
        assert _intact(d)


@pytest.mark.parametrize("args, words", [
    (("plan", "{trace}", "--keep-alive", "-5"), "--keep-alive"),
    (("plan", "{trace}", "--network-rtt", "-1"), "--network-rtt"),
    (("plan", "{trace}", "--slo-ttft", "nan"), "--slo-ttft"),
    (("plan", "{trace}", "--slo-tpot", "inf"), "--slo-tpot"),
    (("plan", "{trace}", "--confidence", "1"), "--confidence"),
    (("plan", "{trace}", "--strategy", "moeless", "--gpus", "0"), "--gpus"),
    (("plan", "{trace}", "--window", "0"), "--window"),
    (("finetune-router", "{model}", "--lr", "nan", "--out", "{root}/ft"), "--lr"),
    (("finetune-router", "{model}", "--steps", "0", "--out", "{root}/ft"), "--steps"),
    (("profile", "{model}", "--gen-tokens", "-1", "--prompts", "builtin:mixed"), "--gen-tokens"),
    (("serve", "{model}", "--request-timeout", "-1"), "--request-timeout"),
    (("bench", "--rate", "0"), "--rate"),
    (("plan", "{trace}", "--no-such-flag"), "No such option"),
    (("plan",), "Missing argument"),
])
def test_bad_values_are_usage_errors_on_one_line(traced, args, words):
    t0 = time.monotonic()
    r = run_cli(*[a.format(trace=traced["trace"], model=traced["model"], root=traced["root"]) for a in args])
    line = _one_line_error(r)
    assert words in line and "--help" in line
    assert time.monotonic() - t0 < 10  # at parse time, not after minutes of work
    assert not (traced["root"] / "ft").exists()


def test_failed_profile_leaves_no_trace(traced, tmp_path):
    out = tmp_path / "out.trace"
    r = run_cli("profile", traced["model"], "--prompts", "builtin:mixed", "--max-prompts", "2", "--out", out,
                "--hardware", "--hardware-out", "/proc/no-such-dir/hw.yaml")
    _one_line_error(r)
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_checkpoint_is_a_one_line_error(traced, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(traced["model"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    line = _one_line_error(run_cli("profile", broken, "--prompts", "builtin:mixed", "--max-prompts", "2",
                                   "--out", tmp_path / "t.trace"))
    assert "safetensors" in line
    assert not (tmp_path / "t.trace").exists()


def test_moeless_plan_of_few_devices(traced, tmp_path):
    r = run_cli("plan", traced["trace"], "--strategy", "moeless", "--gpus", "1", "--out", tmp_path / "p.yaml")
    assert r.code in (0, 2) and "internal error" not in r.err, r.err


def _remoe_plan(traced, tiny_model_dirs, tmp_path):
    from moeserve.hardware import measure_hardware, save_profile
    from moeserve.models.loading import load_model

    model = load_model(traced["model"])
    hw = measure_hardware(32, 16, model=model, thread_counts=[1], token_counts=[1, 4, 16, 64], repeats=2,
                          prefill_lengths=(16, 64), decode_batches=(1, 2), name="tiny",
                          measure_transport_round_trip=False)
    save_profile(hw, tmp_path / "hw.yaml")
    out = tmp_path / "plan.yaml"
    r = run_cli("plan", traced["trace"], "--hardware", tmp_path / "hw.yaml", "--slo-ttft", "5", "--slo-tpot", "1",
                "--out", out)
    assert r.code == 0, r.err
    return out


def test_a_plan_for_another_model_is_refused(traced, tiny_model_dirs, tmp_path):
    from moeserve.engine.build import placement_for_model
    from moeserve.plan.schema import load_plan

    path = _remoe_plan(traced, tiny_model_dirs, tmp_path)
    plan = load_plan(path)
    placement_for_model(plan, str(traced["model"]))  # its own model: fine
    with pytest.raises(Exception, match="another model"):
        placement_for_model(plan, str(tiny_model_dirs["mixtral"]))  # whether or not it has remote experts
    assert plan.checkpoint["fingerprint"]
    line = _one_line_error(run_cli("serve", tiny_model_dirs["mixtral"], "--plan", path))
    assert "another model" in line
    # the same architecture, other weights: the checkpoint fingerprint tells them apart
    from tiny_models import save_tiny_model, save_tiny_tokenizer

    other = tmp_path / "other-weights"
    save_tiny_model("qwen3_moe", other, seed=7)
    save_tiny_tokenizer(other)
    with pytest.raises(Exception, match="another checkpoint"):
        placement_for_model(plan, str(other))


@pytest.mark.parametrize("field, value", [("keep_alive_s", -5), ("memory_mb", float("nan")), ("experts", "all"),
                                          ("id", "../../etc"), ("layer", "one")])
def test_bad_plan_fields_are_refused_at_load(traced, tiny_model_dirs, tmp_path, field, value):
    from moeserve.errors import MoeServeError
    from moeserve.plan.schema import load_plan

    path = tmp_path / "p.yaml"
    raw = {"schema": "moeserve.plan/1", "strategy": "remoe", "model": "x",
           "geometry": {"moe_layers": [0], "num_experts": 4},
           "main": {"device": "cpu", "local_experts": {0: [0, 1]}},
           "functions": [{"id": "L0-r0", "layer": 0, "experts": [2, 3], "memory_mb": 256, "keep_alive_s": 60}]}
    raw["functions"][0][field] = value
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MoeServeError):
        load_plan(path)


def test_a_binary_plan_is_one_line(traced, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    line = _one_line_error(run_cli("serve", traced["model"], "--plan", path))
    assert "plan" in line
