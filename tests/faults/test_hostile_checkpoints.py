"""Hostile holo checkpoints: any JSON value in any place of a real index, deep and huge indexes,
and what killed saves leave behind. Every case is a typed error or correct tensors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_arbiter.errors import ArbiterError, FormatError
from torch_arbiter.holo import HoloTensor, plan_quality
from torch_arbiter.holo.format import FORMAT_VERSION, INDEX_NAME, HoloCheckpoint, save_holo

_ROOT = Path(__file__).resolve().parents[2]

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def _places(value, path=()):
    """Every (path) of a value inside the index's tensors and fragments tables."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path + (key,)
            yield from _places(item, path + (key,))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            yield path + (number,)
            yield from _places(item, path + (number,))


@pytest.fixture(scope="module")
def pristine(small_holo_dir):
    index = json.loads((small_holo_dir / INDEX_NAME).read_text())
    places = [p for p in _places({"tensors": index["tensors"], "fragments": index["fragments"]})]
    expected = dict(HoloCheckpoint.open(small_holo_dir).iter_tensors())
    return index, places, expected


def _exercise(directory: Path, expected: dict) -> None:
    """Open and use the checkpoint fully; a success must give the right tensors."""
    checkpoint = HoloCheckpoint.open(directory)
    holos = {}
    for name, tensor in checkpoint.iter_tensors():
        if isinstance(tensor, HoloTensor):
            holos[name] = tensor
            for k in range(1, tensor.num_levels + 1):
                tensor.level_bytes(k), tensor.level_fidelity(k)
                decoded = tensor.decode(k)
                assert decoded.shape == expected[name].shape
            assert torch.equal(tensor.decode(tensor.num_levels), expected[name].decode(expected[name].num_levels))
        else:
            assert torch.equal(tensor, expected[name])
    for q in (0.0, 0.3, 1.0):
        plan_quality(holos, q)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.integers(min_value=0), value=_JSON, drop=st.booleans())
def test_any_value_anywhere_in_the_index_is_a_typed_error_or_correct(pristine, small_holo_dir, tmp_path, choice, value,
                                                                    drop):
    index, places, expected = pristine
    directory = tmp_path / f"ckpt-{choice}-{abs(hash(repr(value)))}"
    if not directory.exists():
        directory.mkdir()
        for source in small_holo_dir.iterdir():
            if source.name != INDEX_NAME:
                os.link(source, directory / source.name)
    hostile = json.loads(json.dumps(index))
    path = places[choice % len(places)]
    container = {"tensors": hostile["tensors"], "fragments": hostile["fragments"]}
    for key in path[:-1]:
        container = container[key]
    if drop and isinstance(container, dict):
        del container[path[-1]]
    else:
        container[path[-1]] = value
    (directory / INDEX_NAME).write_text(json.dumps(hostile))
    try:
        _exercise(directory, expected)
    except ArbiterError:
        pass


@pytest.mark.parametrize("mutate, why", [
    (lambda ix, t, f: t["layer.weight"].update(group_size=0), "code parameters|group"),
    (lambda ix, t, f: t["layer.weight"].update(shape=None), "shape"),
    (lambda ix, t, f: t["layer.weight"].update(shape=["a"]), "shape"),
    (lambda ix, t, f: t["layer.weight"]["levels"][0].update(bytes=-5), "bytes"),
    (lambda ix, t, f: t["layer.weight"]["levels"][0].update(bytes=10**30), "bytes"),
    (lambda ix, t, f: t["layer.weight"]["levels"][1].update(bytes=1), "bytes"),
    (lambda ix, t, f: t["layer.weight"]["levels"][0]["fidelity"].update(rel_error=float("nan")), "fidelity"),
    (lambda ix, t, f: f[next(iter(f))].update(file=7), "outside"),
    (lambda ix, t, f: f[next(iter(f))].update(file="../x"), "outside"),
    (lambda ix, t, f: f[next(iter(f))].update(length=2**62), "limit|length"),
    (lambda ix, t, f: f[next(iter(f))].update(offset=-1), "byte range"),
    (lambda ix, t, f: f[next(iter(f))].update(sha256=None), "sha256"),
    (lambda ix, t, f: f[next(iter(f))].update(dtype="float128"), "dtype"),
    (lambda ix, t, f: ix.update(tensors=[]), "tensors"),
    (lambda ix, t, f: ix.update(metadata=3), "metadata"),
])
def test_named_hostile_indexes_are_format_errors(pristine, small_holo_dir, tmp_path, mutate, why):
    index = json.loads(json.dumps(pristine[0]))
    shutil.copytree(small_holo_dir, tmp_path / "c")
    mutate(index, index["tensors"], index["fragments"])
    (tmp_path / "c" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FormatError, match=why):
        HoloCheckpoint.open(tmp_path / "c")


def test_deep_and_huge_indexes_are_refused_without_parsing_them_whole(small_holo_dir, tmp_path):
    shutil.copytree(small_holo_dir, tmp_path / "deep")
    (tmp_path / "deep" / INDEX_NAME).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(FormatError, match="deep"):
        HoloCheckpoint.open(tmp_path / "deep")
    nested = {"format": "torch-arbiter-holo", "version": FORMAT_VERSION, "tensors": {}, "fragments": {}, "metadata": {}}
    node = nested["metadata"]
    for _ in range(200):  # under the parser's recursion limit, over the index's depth cap
        node["x"] = {}
        node = node["x"]
    (tmp_path / "deep" / INDEX_NAME).write_text(json.dumps(nested))
    with pytest.raises(FormatError, match="deeper than"):
        HoloCheckpoint.open(tmp_path / "deep")
    index = (small_holo_dir / INDEX_NAME).read_bytes()
    with pytest.raises(FormatError, match="max_index_bytes"):
        HoloCheckpoint.open(small_holo_dir, max_index_bytes=len(index) - 1)
    assert HoloCheckpoint.open(small_holo_dir, max_index_bytes=len(index)).tensor_names()
    with pytest.raises(FormatError, match="fragment limit"):
        HoloCheckpoint.open(small_holo_dir, max_fragment_bytes=100)


def _killed_save(dest: Path, stop_at: str) -> None:
    """Run save_holo(dest, overwrite=True) in a child and SIGKILL it at ``stop_at``."""
    code = textwrap.dedent(f"""
        import os, signal, torch
        from torch_arbiter.holo import format as f
        if {stop_at!r} == "between_renames":
            real = os.rename
            calls = []
            def rename(a, b):
                real(a, b); calls.append(b)
                if len(calls) == 1: os.kill(os.getpid(), signal.SIGKILL)
            f.os.rename = rename
        else:
            def save_file(*a, **k): os.kill(os.getpid(), signal.SIGKILL)
            f.save_file = save_file
        f.save_holo({str(dest)!r}, {{"w": torch.full((4,), 7.0)}}, overwrite=True)
    """)
    child = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]


def test_killed_saves_leave_nothing_that_the_next_save_or_open_does_not_clean(tmp_path):
    dest = tmp_path / "ckpt"
    save_holo(dest, {"w": torch.ones(4)})
    _killed_save(dest, "mid_write")
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name], "the kill should leave a temporary dir"
    save_holo(dest, {"w": torch.zeros(4)}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(HoloCheckpoint.open(dest).load_tensor("w"), torch.zeros(4))

    _killed_save(dest, "between_renames")
    assert not dest.exists(), "killed between its renames: the old checkpoint is aside"
    checkpoint = HoloCheckpoint.open(dest)  # put back on open
    assert torch.equal(checkpoint.load_tensor("w"), torch.zeros(4))
    save_holo(tmp_path / "other", {"w": torch.ones(1)})
    save_holo(dest, {"w": torch.ones(4)}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other"]


def test_a_live_writers_temporary_dir_is_left_alone(tmp_path):
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-abc"
    live.mkdir()
    save_holo(tmp_path / "ckpt", {"w": torch.ones(2)})
    assert live.exists()
