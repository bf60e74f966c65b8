"""Prompt sources (builtin sets, .jsonl, .txt), seeded subsets, Azure arrivals, scaling and prompt pairing."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.workloads import (
    ArrivalTrace,
    Prompt,
    builtin_names,
    load_arrivals,
    load_prompts,
    mean_rate,
    pair_prompts,
    read_arrivals_csv,
    scale_arrivals,
)
from moeserve.workloads import builtin as builtin_module
from moeserve.workloads.subset import even_quotas

DATA_DIR = builtin_module.DATA_DIR
MTBENCH_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def sources_table_counts() -> dict[str, int]:
    """Prompt counts as SOURCES.md states them (| set | file | prompts | ...)."""
    rows = re.findall(r"^\| (\w+) \| \w+\.jsonl \| (\d+) \|", (DATA_DIR / "SOURCES.md").read_text(), re.M)
    return {name: int(count) for name, count in rows}


# ---------------------------------------------------------------- builtin sets


def test_builtin_names_cover_every_set():
    assert builtin_names() == ["mtbench", "code", "math", "qa", "mixed", "corpus"]


@pytest.mark.parametrize(
    "name, domains",
    [("mtbench", MTBENCH_CATEGORIES), ("code", {"code"}), ("math", {"math"}), ("qa", {"qa"}),
     ("mixed", {"chat", "code", "math", "qa"})],
)
def test_builtin_loads_with_domains_and_unique_ids(name, domains):
    prompts = load_prompts(f"builtin:{name}")
    assert {p.domain for p in prompts} == domains
    assert all(p.id and p.text.strip() for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(isinstance(p, Prompt) for p in prompts)


def test_vendored_counts_match_sources_md_and_files_are_small():
    counts = sources_table_counts()
    assert set(counts) == {"mtbench", "code", "math", "qa"}
    for name, count in counts.items():
        assert len(load_prompts(f"builtin:{name}")) == count
    sizes = {p.name: p.stat().st_size for p in DATA_DIR.glob("*.jsonl")}
    assert max(sizes.values()) < 1_000_000 and sum(sizes.values()) < 3_000_000


def test_mtbench_keeps_both_turns_and_text_is_the_first():
    prompts = load_prompts("builtin:mtbench")
    assert len(prompts) == 80
    assert Counter(p.domain for p in prompts) == {c: 10 for c in MTBENCH_CATEGORIES}
    for p in prompts:
        assert [m["role"] for m in p.messages] == ["user", "user"]
        assert p.text == p.messages[0]["content"]
        assert re.fullmatch(r"mtbench/\d+", p.id)


def test_qa_is_stratified_by_subject():
    rows = [json.loads(line) for line in (DATA_DIR / "qa.jsonl").read_text().splitlines()]
    per_subject = Counter(r["subject"] for r in rows)
    assert len(set(per_subject.values())) == 1  # the same number from every subject
    assert all(re.search(r"\nA\. .*\nB\. .*\nC\. .*\nD\. ", r["prompt"], re.S) for r in rows)


def test_mixed_is_an_even_mix_of_the_vendored_sets():
    mixed = load_prompts("builtin:mixed")
    sources = {name: {p.id: p for p in load_prompts(f"builtin:{name}")} for name in ("mtbench", "code", "math", "qa")}
    smallest = min(len(s) for s in sources.values())
    assert Counter(p.domain for p in mixed) == {d: smallest for d in ("chat", "code", "math", "qa")}
    label = {"mtbench": "chat", "code": "code", "math": "math", "qa": "qa"}
    for p in mixed:
        (origin,) = [name for name, by_id in sources.items() if p.id in by_id]
        assert p.domain == label[origin]
        assert p.text == sources[origin][p.id].text
    assert load_prompts("builtin:mixed") == mixed


def write_heldout(root: Path, domains=("code", "docs", "prose", "dictionary")) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for d in domains:
        lines = [json.dumps({"text": f"{d} sample {i}", "domain": d}) for i in range(3)]
        (root / f"{d}.jsonl").write_text("\n".join(lines) + "\n")


def test_corpus_reads_heldout_text(tmp_path, monkeypatch):
    write_heldout(tmp_path / "heldout")
    monkeypatch.setattr(builtin_module, "HELDOUT_DIR", tmp_path / "heldout")
    prompts = load_prompts("builtin:corpus")
    assert Counter(p.domain for p in prompts) == {"code": 3, "docs": 3, "prose": 3, "dictionary": 3}
    assert prompts[0].id == "corpus/code/1" and prompts[0].text == "code sample 0"
    assert len({p.id for p in prompts}) == 12
    two = load_prompts("builtin:corpus", max_prompts=8)
    assert Counter(p.domain for p in two) == {"code": 2, "docs": 2, "prose": 2, "dictionary": 2}


def test_corpus_missing_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_module, "HELDOUT_DIR", tmp_path / "absent")
    with pytest.raises(MoeServeError, match="held-out"):
        load_prompts("builtin:corpus")
    write_heldout(tmp_path / "partial", domains=("code", "prose"))
    monkeypatch.setattr(builtin_module, "HELDOUT_DIR", tmp_path / "partial")
    with pytest.raises(MoeServeError, match=r"docs\.jsonl, dictionary\.jsonl"):
        load_prompts("builtin:corpus")


# ---------------------------------------------------------------- subsets


def test_max_prompts_is_deterministic_stratified_and_in_source_order():
    full = load_prompts("builtin:mixed")
    position = {p.id: i for i, p in enumerate(full)}
    a = load_prompts("builtin:mixed", max_prompts=22, seed=3)
    assert a == load_prompts("builtin:mixed", max_prompts=22, seed=3)
    assert a != load_prompts("builtin:mixed", max_prompts=22, seed=4)
    assert len(a) == 22
    counts = Counter(p.domain for p in a)
    assert set(counts) == {"chat", "code", "math", "qa"} and max(counts.values()) - min(counts.values()) <= 1
    assert [position[p.id] for p in a] == sorted(position[p.id] for p in a)
    mtbench = load_prompts("builtin:mtbench", max_prompts=16, seed=0)
    assert Counter(p.domain for p in mtbench) == {c: 2 for c in MTBENCH_CATEGORIES}


def test_max_prompts_at_or_above_size_keeps_all_and_zero_is_an_error():
    assert len(load_prompts("builtin:mtbench", max_prompts=1000)) == 80
    with pytest.raises(MoeServeError, match="max_prompts"):
        load_prompts("builtin:mtbench", max_prompts=0)


def is_even_split(quotas: dict[str, int], capacities: dict[str, int], k: int) -> bool:
    """Brute-force definition: total right, within capacity, and no group short of another by 2+ unless full."""
    if sum(quotas.values()) != min(k, sum(capacities.values())):
        return False
    if any(not 0 <= quotas[g] <= capacities[g] for g in capacities):
        return False
    return all(quotas[a] >= quotas[b] - 1 or quotas[a] == capacities[a] for a in quotas for b in quotas)


def test_even_quotas_water_fill_against_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        capacities = {f"g{i}": int(c) for i, c in enumerate(rng.integers(0, 12, size=rng.integers(1, 6)))}
        k = int(rng.integers(0, 50))
        quotas = even_quotas(capacities, k, seed=int(rng.integers(0, 5)))
        assert is_even_split(quotas, capacities, k), (capacities, k, quotas)


# ---------------------------------------------------------------- files


def test_jsonl_with_prompt_text_and_messages(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    lines = [
        json.dumps({"prompt": "alpha", "domain": "x", "id": "a1"}),
        "",
        json.dumps({"text": "beta", "id": 7}),
        json.dumps({"messages": chat, "domain": "chat"}),
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prompts = load_prompts(str(path))
    assert [(p.text, p.domain, p.id) for p in prompts] == [
        ("alpha", "x", "a1"), ("beta", None, "7"), ("first", "chat", "mine/4")]
    assert prompts[2].messages == tuple(chat) and prompts[0].messages is None


def test_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("\ufeffhello there\n\n   \nsecond prompt\r\nthird\n")
    prompts = load_prompts(str(path))
    assert [(p.text, p.id, p.domain) for p in prompts] == [
        ("hello there", "plain/1", None), ("second prompt", "plain/4", None), ("third", "plain/5", None)]


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.jsonl", "", "empty"),
        ("blank.txt", "\n  \n", "empty"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "ok too"}\n{"prompt": oops}\n', "line 3: not valid JSON"),
        ("list.jsonl", '{"prompt": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("nofield.jsonl", '{"prompt": "ok"}\n{"question": "?"}\n', 'line 2: needs a "prompt"'),
        ("badmsg.jsonl", '{"messages": [{"role": "user"}]}\n', "line 1: .*messages"),
        ("dup.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "line 2: id 'x' already used"),
        ("blanks.jsonl", '{"prompt": "  "}\n{"text": ""}\n', "no usable prompt"),
        ("data.csv", "a,b\n", "unsupported prompt source"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MoeServeError, match=pattern) as info:
        load_prompts(str(path))
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(MoeServeError, match="not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(MoeServeError, match="valid: mtbench, code, math, qa, mixed, corpus"):
        load_prompts("builtin:nosuch")


# ---------------------------------------------------------------- arrivals


@pytest.fixture(scope="module")
def traces() -> dict[str, ArrivalTrace]:
    return {name: load_arrivals(name) for name in ("azure-code", "azure-conv")}


@pytest.mark.parametrize("name, file, rows", [("azure-code", "code.csv", 8819), ("azure-conv", "conv.csv", 19366)])
def test_azure_traces_parse(traces, name, file, rows):
    trace = traces[name]
    lines = (DATA_DIR / "azure-llm-2023" / file).read_text(encoding="utf-8-sig").strip().splitlines()[1:]
    assert len(trace.arrival_s) == len(lines) == rows
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.context_tokens.dtype == np.int64 and trace.generated_tokens.dtype == np.int64
    # independent reference for the span: datetime with the fraction cut to microseconds
    first, last = (dt.datetime.fromisoformat(line.split(",")[0][:26]) for line in (lines[0], lines[-1]))
    assert trace.arrival_s[-1] == pytest.approx((last - first).total_seconds(), abs=2e-6)
    assert trace.context_tokens[-1] == int(lines[-1].split(",")[1])
    assert trace.generated_tokens[0] == int(lines[0].split(",")[2])


def test_csv_with_bom_unsorted_rows_and_short_fractions(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(
        "\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        "2023-11-16 18:15:47.5,20,2\r\n"
        "2023-11-16 18:15:46.1234567,10,1\r\n"
        "2023-11-16 18:16:46,30,3\r\n".encode()
    )
    trace = read_arrivals_csv(path)
    assert trace.name == "t"
    np.testing.assert_allclose(trace.arrival_s, [0.0, 1.3765433, 59.8765433], atol=1e-9)
    assert trace.context_tokens.tolist() == [10, 20, 30] and trace.generated_tokens.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "body, pattern",
    [("2023-11-16 18:15:46,10\n", "line 2"), ("2023-13-16 18:15:46,10,1\n", "line 2: bad timestamp"),
     ("2023-11-16 18:15:46,10,1\n2023-11-16 18:15:47.x1,1,1\n", "line 3: bad timestamp")],
)
def test_bad_csv_rows(tmp_path, body, pattern):
    path = tmp_path / "bad.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + body)
    with pytest.raises(MoeServeError, match=pattern):
        read_arrivals_csv(path)


def test_unknown_trace_name():
    with pytest.raises(MoeServeError, match="azure-conv, azure-code"):
        load_arrivals("azure-other")


@pytest.mark.parametrize("name", ["azure-code", "azure-conv"])
@pytest.mark.parametrize("rate", [0.5, 12.0])
def test_scale_to_rate(traces, name, rate):
    trace = traces[name]
    scaled = scale_arrivals(trace, rate=rate)
    observed = (len(scaled.arrival_s) - 1) / scaled.arrival_s[-1]
    assert observed == pytest.approx(rate, rel=0.01)
    np.testing.assert_allclose(scaled.arrival_s * rate, trace.arrival_s * mean_rate(trace), rtol=1e-12)
    assert np.array_equal(scaled.context_tokens, trace.context_tokens)


def test_scale_to_rate_within_duration_keeps_the_rate(traces):
    trace = traces["azure-code"]  # bursty: cutting after scaling would miss the rate badly
    scaled = scale_arrivals(trace, rate=4.0, duration_s=120.0)
    assert len(scaled.arrival_s) == 481 and scaled.arrival_s[-1] <= 120.0
    assert mean_rate(scaled) == pytest.approx(4.0, rel=0.01)
    assert np.array_equal(scaled.generated_tokens, trace.generated_tokens[:481])


def test_speedup_and_duration_cut(traces):
    trace = traces["azure-conv"]
    fast = scale_arrivals(trace, speedup=4.0)
    np.testing.assert_allclose(fast.arrival_s, trace.arrival_s / 4.0)
    assert mean_rate(fast) == pytest.approx(4.0 * mean_rate(trace), rel=1e-9)
    cut = scale_arrivals(trace, speedup=4.0, duration_s=100.0)
    expected = int(np.sum(trace.arrival_s / 4.0 <= 100.0))
    assert len(cut.arrival_s) == expected and cut.arrival_s[-1] <= 100.0 < fast.arrival_s[expected]


def test_scale_argument_errors(traces):
    trace = traces["azure-code"]
    with pytest.raises(MoeServeError, match="not both"):
        scale_arrivals(trace, rate=1.0, speedup=2.0)
    with pytest.raises(MoeServeError, match="positive"):
        scale_arrivals(trace, speedup=0.0)
    with pytest.raises(MoeServeError, match="positive"):
        scale_arrivals(trace, duration_s=-1.0)


# ---------------------------------------------------------------- pairing


def synthetic(context: list[int]) -> ArrivalTrace:
    n = len(context)
    return ArrivalTrace("t", np.arange(n, dtype=np.float64), np.asarray(context, dtype=np.int64), np.ones(n, np.int64))


def word_prompts(word_counts: list[int]) -> list[Prompt]:
    return [Prompt(text=" ".join(["w"] * c), domain=None, id=f"p{i}") for i, c in enumerate(word_counts)]


def test_pairing_is_rank_matching_for_equal_sizes():
    rng = np.random.default_rng(1)
    context = rng.permutation(np.arange(100, 5000, 70)).tolist()
    prompts = word_prompts(rng.permutation(np.arange(1, len(context) + 1)).tolist())
    count_words = lambda text: len(text.split())  # noqa: E731
    paired = pair_prompts(synthetic(context), prompts, tokenizer_len=count_words)
    # brute force: the k-th shortest arrival gets the k-th shortest prompt
    by_context = sorted(range(len(context)), key=lambda i: context[i])
    by_length = sorted(range(len(prompts)), key=lambda i: count_words(prompts[i].text))
    assert [paired[a] for a in by_context] == by_length


def test_pairing_more_arrivals_than_prompts_is_monotone_and_uses_every_prompt(traces):
    trace = traces["azure-code"]
    prompts = load_prompts("builtin:code")
    paired = pair_prompts(trace, prompts, seed=5)
    assert paired == pair_prompts(trace, prompts, seed=5)
    lengths = np.array([len(prompts[i].text) for i in paired])
    order = np.lexsort((lengths, trace.context_tokens))
    assert np.all(np.diff(lengths[order]) >= 0)  # a longer context never gets a shorter prompt
    assert lengths[np.argmax(trace.context_tokens)] == max(len(p.text) for p in prompts)
    assert lengths[np.argmin(trace.context_tokens)] == min(len(p.text) for p in prompts)
    assert set(paired) == set(range(len(prompts)))


def test_pairing_breaks_ties_by_seed():
    prompts = word_prompts([3] * 10)
    trace = synthetic([50] * 10)
    by_seed = {tuple(pair_prompts(trace, prompts, tokenizer_len=lambda t: 3, seed=s)) for s in range(5)}
    assert all(sorted(p) == list(range(10)) for p in by_seed)  # equal lengths spread, none repeated
    assert len(by_seed) > 1
    with pytest.raises(MoeServeError, match="no prompts"):
        pair_prompts(trace, [])
