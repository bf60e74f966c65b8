#!/usr/bin/env python
"""Measure this machine's hardware profile for the demo model's expert geometry and ship it.

    python scripts/measure_hardware_profile.py                      # -> profiles/hardware/cpu-<N>core.yaml
    python scripts/measure_hardware_profile.py --notes "measured while the machine was busy"
    python scripts/measure_hardware_profile.py --references         # rewrite a100-80gb.yaml, h100-sxm.yaml

Run it on a quiet machine: every figure is a median over --repeats calls, but other processes on the
same cores still slow the measurement down.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moeserve.hardware import save_profile

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "profiles" / "hardware"
DEMO_HIDDEN, DEMO_EXPERT_INTERMEDIATE = 192, 96


def _load_model(spec: str):
    from moeserve.models.loading import DEMO_MODEL_DIR, load_model

    if spec == "none" or (spec == "auto" and not (DEMO_MODEL_DIR / "config.json").is_file()):
        return None
    return load_model("demo" if spec == "auto" else spec, device="cpu")


def _write_references(hidden: int, intermediate: int) -> None:
    from moeserve.hardware.reference import REFERENCE_HOSTS, reference_profile

    for name in REFERENCE_HOSTS:
        path = PROFILES / f"{name}.yaml"
        save_profile(reference_profile(name, hidden, intermediate), path)
        print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=DEMO_HIDDEN)
    parser.add_argument("--intermediate-size", type=int, default=DEMO_EXPERT_INTERMEDIATE)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated expert dtypes")
    parser.add_argument("--model", default="auto",
                        help="model for the non-expert latency: auto (the bundled demo if present), demo, a "
                             "directory, or none")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--name", default=None, help="profile name (default: cpu-<cores>core or the GPU's name)")
    parser.add_argument("--out", type=Path, default=None, help="default: profiles/hardware/<name>.yaml")
    parser.add_argument("--notes", default="")
    parser.add_argument("--references", action="store_true",
                        help="only rewrite the datasheet-based reference profiles (a100-80gb, h100-sxm)")
    args = parser.parse_args(argv)

    if args.references:
        _write_references(args.hidden_size, args.intermediate_size)
        return 0

    from moeserve.hardware import measure_hardware

    model = _load_model(args.model)
    notes = args.notes
    if model is None:
        notes = (notes + "; " if notes else "") + "no model given: non-expert latency not measured"

    def report(step: str, i: int, n: int) -> None:
        print(f"[{i}/{n}] {step}", file=sys.stderr, flush=True)

    started = time.time()
    profile = measure_hardware(
        args.hidden_size, args.intermediate_size, dtype=args.dtypes.split(","), model=model,
        repeats=args.repeats, progress=report, name=args.name, notes=notes,
        source="measured by scripts/measure_hardware_profile.py "
               f"(demo expert geometry: hidden {args.hidden_size}, intermediate {args.intermediate_size})",
    )
    out = args.out or PROFILES / f"{profile.name}.yaml"
    save_profile(profile, out)
    print(f"wrote {out} in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
