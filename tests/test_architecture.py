"""The package layering of docs/architecture.md holds: every import points to a lower layer, and every
module imports on its own in a fresh interpreter (no import cycle held together by import order)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import moeserve

# The layers of docs/architecture.md, lowest first. A package may import only from lower layers.
LAYERS = [
    {"__init__", "errors", "units", "defaults"},
    {"shipped", "atomic"},
    {"models", "workloads", "cache", "pricing", "plan"},
    {"hardware", "traces"},
    {"remoe", "moeless", "finetune"},
    {"planner", "profiling"},
    {"experts"},
    {"engine"},
    {"serving"},
    {"cli"},
]
SRC = Path(moeserve.__file__).parent
# Function-local imports allowed, and why (everything else is imported at the top of its module).
LOCAL_IMPORTS_ALLOWED = {
    "cli": "each command imports its core module when it runs: --help and usage errors stay fast (no torch)",
    "moeserve.cache._numba_kernel": "compiled kernels, optional: the numpy fallback runs without numba",
    "moeserve.remoe._lpt_numba": "compiled LPT, optional: the heap fallback runs without numba",
    "pynvml": "NVIDIA only",
    "matplotlib": "heavy, only for bench --plot",
    "matplotlib.pyplot": "heavy, only for bench --plot",
    "transformers.activations": "rare activations only: expert-function processes start ~1 s sooner without it",
    "ray": "optional heavy dependency (moeserve[ray]): imported only when the Ray backend or a Ray export runs",
    "ray.serve": "optional heavy dependency (moeserve[ray]), as ray",
    "ray.serve.context": "optional heavy dependency (moeserve[ray]): Serve's instance details for the poller",
    "ray.serve.schema": "optional heavy dependency (moeserve[ray]): the Serve config schema exports validate with",
    "kubernetes_validate": "dev extra only: Kubernetes' schemas for `export kubernetes` (the rest works without it)",
}


def _layer(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        yield path, rel.parts[0].removesuffix(".py"), ast.parse(path.read_text())


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            yield node, [a.name for a in node.names]


def test_every_package_has_a_layer():
    packages = {path.relative_to(SRC).parts[0].removesuffix(".py") for path in SRC.rglob("*.py")}
    assert packages <= set().union(*LAYERS), packages - set().union(*LAYERS)


def test_no_upward_or_sideways_import():
    wrong = []
    for path, package, tree in _modules():
        for _, names in _imports(tree):
            for name in names:
                parts = name.split(".")
                if parts[0] != "moeserve" or len(parts) == 1:
                    continue
                target = parts[1] if any(parts[1] in layer for layer in LAYERS) else "__init__"  # __version__
                if target != package and _layer(target) >= _layer(package):
                    wrong.append(f"{path.relative_to(SRC)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_function_local_imports_are_only_the_documented_ones():
    found = []
    for path, package, tree in _modules():
        top = set(map(id, tree.body))
        for node, names in _imports(tree):
            if id(node) in top or package == "cli":
                continue
            found += [f"{path.relative_to(SRC)}: {n}" for n in names
                      if n not in LOCAL_IMPORTS_ALLOWED and n.rsplit(".", 1)[0] not in LOCAL_IMPORTS_ALLOWED]
    assert not found, "\n".join(found)


def test_every_module_imports_alone():
    """Each module imported first, in a child forked from an interpreter that has loaded only the third-party
    packages: an import cycle inside moeserve fails whichever module of it comes first."""
    names = [m.name for m in pkgutil.walk_packages(moeserve.__path__, "moeserve.")]
    script = """
import os, sys, traceback
import numpy, torch, safetensors, fastapi, typer, rich, yaml, psutil, httpx, uvicorn, numba  # noqa: F401
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: F401
from transformers.integrations import moe  # noqa: F401  (resolve transformers' lazy modules once, here)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
            os._exit(0)
        except BaseException:
            traceback.print_exc(limit=-1)
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print(" ".join(failed))
"""
    out = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr[-3000:]
