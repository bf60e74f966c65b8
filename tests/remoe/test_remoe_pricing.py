from __future__ import annotations

import pytest
import yaml

from moeserve.errors import MoeServeError
from moeserve.pricing.profiles import load_pricing, resolve_pricing_path
from moeserve.shipped import shipped_names

GOOD_CPU = {
    "schema": "moeserve.pricing/1",
    "name": "t",
    "source": "test",
    "as_of": "2024-01",
    "currency": "USD",
    "cpu_function": {
        "usd_per_gb_second": 1e-5,
        "usd_per_request": 2e-7,
        "memory_mb": {"min": 128, "max": 10240, "step": 64},
        "mb_per_vcpu": 1769,
        "payload_limit_bytes": 6291456,
        "billing_granularity_s": 0.001,
    },
}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_bundled_profiles_load_and_carry_sources():
    names = shipped_names("pricing")
    assert {"aws-lambda-x86", "aws-lambda-arm", "modal-a100-80gb", "paper-gpu-3x"} <= set(names)
    pricing = load_pricing("aws-lambda-x86", "modal-a100-80gb")
    assert pricing.cpu.usd_per_gb_second == pytest.approx(0.0000166667)
    assert (pricing.cpu.memory_min_mb, pricing.cpu.memory_max_mb, pricing.cpu.memory_step_mb) == (
        128,
        10240,
        1,
    )
    assert pricing.cpu.payload_limit_bytes == 6 * 1024 * 1024
    assert "2024" in pricing.cpu.source and "AWS" in pricing.cpu.source
    # Per GB of GPU memory an A100-80GB on Modal is cheaper than Lambda: the paper's >= 3x does not hold.
    assert pricing.gpu_to_cpu_ratio == pytest.approx(0.000694 / 80 / 0.0000166667)
    assert load_pricing("aws-lambda-x86", "paper-gpu-3x").gpu_to_cpu_ratio == pytest.approx(3.0, rel=1e-4)


def test_memory_rounding_billing_and_gpu_count(tmp_path):
    pricing = load_pricing(write(tmp_path, "c.yaml", GOOD_CPU), "paper-gpu-3x")
    cpu = pricing.cpu
    assert cpu.round_memory_up(100) == 128
    assert cpu.round_memory_up(129) == 192
    assert cpu.round_memory_up(192) == 192
    assert cpu.round_memory_up(99999) == 10240
    assert float(cpu.billed_s(0.0101)) == pytest.approx(0.011)
    assert float(cpu.billed_s(0.0)) == 0.0
    modal = load_pricing("aws-lambda-x86", "modal-a100-80gb").gpu
    assert modal.gpus_needed(79 * 2**30) == 1 and modal.gpus_needed(81 * 2**30) == 2
    assert modal.usd_per_second(81 * 2**30, 0) == pytest.approx(2 * 0.000694)
    gpu = pricing.gpu
    assert gpu.usd_per_second(2 * 2**30, 2**30) == pytest.approx(2 * 0.00005 + 0.0000166667)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("source"), "missing text field 'source'"),
        (lambda d: d.update(schema="other/9"), "schema must be"),
        (
            lambda d: d["cpu_function"].pop("usd_per_gb_second"),
            "missing field cpu_function.usd_per_gb_second",
        ),
        (lambda d: d["cpu_function"].update(usd_per_gb_second=-1), "must be positive"),
        (lambda d: d["cpu_function"].update(usd_per_request="cheap"), "must be a number"),
        (lambda d: d["cpu_function"]["memory_mb"].update(min=20000), "min exceeds max"),
        (lambda d: d.update(currency="EUR"), "only USD"),
        (lambda d: d.pop("cpu_function"), "needs a cpu_function or a gpu_function"),
    ],
)
def test_broken_profiles_give_one_line_errors(tmp_path, mutate, message):
    data = yaml.safe_load(yaml.safe_dump(GOOD_CPU))
    mutate(data)
    path = write(tmp_path, "broken.yaml", data)
    with pytest.raises(MoeServeError, match=message) as info:
        load_pricing(path, "paper-gpu-3x")
    assert "\n" not in str(info.value)


def test_unreadable_missing_and_unbalanced_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cpu_function: [unclosed")
    with pytest.raises(MoeServeError, match="unreadable YAML"):
        load_pricing(bad, "paper-gpu-3x")
    with pytest.raises(MoeServeError, match="unknown pricing profile 'no-such-provider'"):
        resolve_pricing_path("no-such-provider")
    with pytest.raises(MoeServeError, match="exactly one cpu_function and one gpu_function"):
        load_pricing("aws-lambda-x86", "aws-lambda-arm")
    with pytest.raises(MoeServeError, match="exactly one cpu_function and one gpu_function"):
        load_pricing("aws-lambda-x86")
