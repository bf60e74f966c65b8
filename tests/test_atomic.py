"""Outputs never destroy what moeserve did not write, and a failed write leaves nothing."""

from __future__ import annotations

import os

import pytest

from moeserve.atomic import (
    OutputSet,
    atomic_dir,
    atomic_file,
    check_output_dir,
    check_output_file,
    write_text_atomic,
)
from moeserve.errors import MoeServeError


def _tree(root) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_directory_at_a_file_target_is_refused_and_kept(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("x")
    with pytest.raises(MoeServeError, match="is a directory"):
        write_text_atomic(d, "plan")
    assert _tree(d) == {"sub/f": "x"}
    cwd = os.getcwd()
    try:
        os.chdir(d)
        with pytest.raises(MoeServeError, match="is a directory"):
            check_output_file(".")
    finally:
        os.chdir(cwd)
    assert _tree(d) == {"sub/f": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary file left


def test_a_file_is_replaced_whole_and_a_failure_leaves_the_old_one(tmp_path):
    target = tmp_path / "out.yaml"
    write_text_atomic(target, "one")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "one"
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml"]


def test_unwritable_or_impossible_targets_are_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MoeServeError, match="is a file"):
        check_output_file(tmp_path / "afile" / "t.yaml")
    with pytest.raises(MoeServeError):
        check_output_file("/proc/no-such-dir/t.yaml")
    # missing parents are fine, and the check leaves none of them behind
    check_output_file(tmp_path / "new" / "deeper" / "t.yaml")
    assert not (tmp_path / "new").exists()


def test_output_set_writes_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError), OutputSet() as out:
        out.path(tmp_path / "a" / "x.trace").write_text("1")
        out.path(tmp_path / "y.yaml").write_text("2")
        raise RuntimeError("the second half failed")
    assert list(tmp_path.iterdir()) == []
    with OutputSet() as out:
        out.path(tmp_path / "a" / "x.trace").write_text("1")
        out.path(tmp_path / "y.yaml").write_text("2")
    assert _tree(tmp_path) == {"a/x.trace": "1", "y.yaml": "2"}


def test_directory_outputs_replace_only_moeserve_directories(tmp_path):
    marker = "finetune-report.json"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(MoeServeError, match="not written by moeserve"):
            check_output_dir(foreign, marker, force)
    assert _tree(foreign) == {"notes.txt": "mine"}

    ours = tmp_path / "ours"
    with atomic_dir(ours, marker) as tmp:
        (tmp / marker).write_text("{}")
        (tmp / "model.safetensors").write_text("v1")
    with pytest.raises(MoeServeError, match="--force"):
        check_output_dir(ours, marker, force=False)
    with atomic_dir(ours, marker, force=True) as tmp:
        (tmp / marker).write_text("{}")
    assert _tree(ours) == {marker: "{}"}
    with pytest.raises(RuntimeError), atomic_dir(ours, marker, force=True) as tmp:
        raise RuntimeError("training failed")
    assert _tree(ours) == {marker: "{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "ours"]
    with pytest.raises(MoeServeError):
        check_output_dir(".", marker, force=True)
