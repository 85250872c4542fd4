"""The holo checkpoint on disk: round trip, fragments readable alone, typed errors on damage."""

import json
import os

import pytest
import torch

from torch_arbiter.errors import CorruptFragmentError, FormatError, InvalidRequestError
from torch_arbiter.holo import INDEX_NAME, HoloCheckpoint, HoloTensor, decode_fragment, save_holo
from torch_arbiter.holo.format import FORMAT_VERSION


@pytest.fixture()
def tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "layer.weight": HoloTensor.encode(torch.randn(128, 96, generator=gen)),
        "conv.weight": HoloTensor.encode(torch.randn(32, 16, 3, 3, generator=gen).to(torch.bfloat16)),
        "layer.bias": HoloTensor.encode(torch.randn(128, generator=gen)),
        "position_ids": torch.arange(64),
    }


@pytest.fixture()
def saved(tmp_path, tensors):
    return save_holo(tmp_path / "ckpt", tensors, {"source": "test"})


def test_round_trip_every_level_and_plain_tensors(saved, tensors):
    checkpoint = HoloCheckpoint.open(saved)
    assert checkpoint.tensor_names() == list(tensors)
    assert checkpoint.metadata == {"source": "test"}
    for name, original in tensors.items():
        loaded = checkpoint.load_tensor(name)
        if isinstance(original, HoloTensor):
            assert loaded.meta == original.meta
            for k in range(1, original.num_levels + 1):
                assert torch.equal(loaded.decode(k), original.decode(k))
                assert loaded.level_bytes(k) == original.level_bytes(k)
                assert loaded.level_fidelity(k) == original.level_fidelity(k)
        else:
            assert torch.equal(loaded, original)
    low = checkpoint.load_tensor("layer.weight", max_level=1)
    assert set(low.fragments) == set(low.level_fragments(1))


def test_index_records_every_fragment_and_each_reads_alone(saved, tensors):
    checkpoint = HoloCheckpoint.open(saved)
    index = json.loads((saved / INDEX_NAME).read_text())
    assert index["version"] == FORMAT_VERSION
    for fid in checkpoint.fragment_ids():
        entry = checkpoint.fragment_entry(fid)
        assert {"tensor", "level", "file", "offset", "length", "dtype", "shape", "sha256"} <= set(entry)
        with open(saved / entry["file"], "rb") as handle:
            handle.seek(entry["offset"])
            raw = handle.read(entry["length"])
        alone = decode_fragment(entry, raw, source="test")
        assert torch.equal(alone, checkpoint.read_fragment(fid))
        original = tensors[entry["tensor"]]
        expected = original.fragment(entry["name"]) if isinstance(original, HoloTensor) else original
        assert torch.equal(alone, expected)
    weight_levels = index["tensors"]["layer.weight"]["levels"]
    assert [lv["label"] for lv in weight_levels] == ["int4", "int8", "exact"]
    assert all("rel_error" in lv["fidelity"] and lv["bytes"] > 0 for lv in weight_levels)


def test_existing_destination_needs_overwrite_and_leaves_no_temp(tmp_path, tensors, saved):
    with pytest.raises(InvalidRequestError, match="exists"):
        save_holo(saved, tensors)
    smaller = {"position_ids": torch.arange(3)}
    save_holo(saved, smaller, overwrite=True)
    assert HoloCheckpoint.open(saved).tensor_names() == ["position_ids"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(InvalidRequestError):
        save_holo(tmp_path / "x", {"a": torch.zeros(2)}, {"bad": object()})
    with pytest.raises(InvalidRequestError):
        save_holo(tmp_path / "y", {"a::b": torch.zeros(2)})
    assert os.listdir(tmp_path) == []


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_fragment_names_file_and_tensor(saved):
    checkpoint = HoloCheckpoint.open(saved)
    fid = [f for f in checkpoint.fragment_ids() if checkpoint.fragment_entry(f)["tensor"] == "conv.weight"][0]
    entry = checkpoint.fragment_entry(fid)
    _flip_byte(saved / entry["file"], entry["offset"])
    with pytest.raises(CorruptFragmentError, match="conv.weight") as err:
        checkpoint.read_fragment(fid)
    assert entry["file"] in str(err.value)
    with pytest.raises(CorruptFragmentError):
        checkpoint.load_tensor("conv.weight")
    with pytest.raises(CorruptFragmentError, match="bytes"):
        decode_fragment(entry, b"\0" * 3, source="somewhere")


def test_a_fragment_changed_on_disk_after_its_first_read_is_caught(tmp_path, tensors):
    """Re-reads of an unchanged file skip the checksum; a write to the file brings it back."""
    directory = save_holo(tmp_path / "holo", tensors)
    checkpoint = HoloCheckpoint.open(directory)
    fid = checkpoint.fragment_ids("conv.weight")[0]
    entry = checkpoint.fragment_entry(fid)
    first = checkpoint.read_fragment(fid)
    assert torch.equal(checkpoint.read_fragment(fid), first)  # same file: served without hashing
    path = directory / entry["file"]
    before = os.stat(path).st_mtime_ns
    _flip_byte(path, entry["offset"])
    assert os.stat(path).st_mtime_ns != before  # what the check keys on (with inode and size)
    with pytest.raises(CorruptFragmentError, match="conv.weight"):
        checkpoint.read_fragment(fid)


def test_truncated_file_and_bad_index_are_format_errors(saved):
    index_path = saved / INDEX_NAME
    index = json.loads(index_path.read_text())
    data_file = saved / next(iter(index["fragments"].values()))["file"]
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="outside"):
        HoloCheckpoint.open(saved)
    data_file.write_bytes(data)

    def broken(mutate):
        damaged = json.loads(json.dumps(index))
        mutate(damaged)
        index_path.write_text(json.dumps(damaged))
        with pytest.raises(FormatError) as err:
            HoloCheckpoint.open(saved).load_tensor("layer.weight")
        return str(err.value)

    first = next(iter(index["fragments"]))
    assert "missing" in broken(lambda ix: ix["fragments"][first].update(file="nope.safetensors"))
    assert "outside" in broken(lambda ix: ix["fragments"][first].update(file="../x"))
    assert "does not list" in broken(lambda ix: ix["fragments"][first].update(tensor="ghost"))
    assert "version" in broken(lambda ix: ix.update(version=99))
    # Older versions held other codes (v2: bf16 lo_scales, no lo_ratio; v3: one int8 per rotation
    # sign): refused, with what to do.
    assert "re-convert" in broken(lambda ix: ix.update(version=2))
    assert "re-convert" in broken(lambda ix: ix.update(version=3))
    wrong_shape = next(f for f, e in index["fragments"].items() if e["tensor"] == "layer.weight" and e["name"] == "hi")

    def reshape(ix):
        ix["fragments"][wrong_shape]["shape"] = [1, ix["fragments"][wrong_shape]["length"]]

    assert "expected" in broken(reshape)
    index_path.write_text("{not json")
    with pytest.raises(FormatError, match="JSON"):
        HoloCheckpoint.open(saved)
    with pytest.raises(FormatError, match="no tensor"):
        index_path.write_text(json.dumps(index))
        HoloCheckpoint.open(saved).load_tensor("ghost")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FormatError, match="convert"):
        HoloCheckpoint.open(tmp_path)
