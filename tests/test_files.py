"""ckptavg.files: atomic writes, the folder lock, and snapshot files verified against their records."""

import json

import pytest
import torch

from ckptavg.errors import CorruptSnapshotError, FolderLockedError
from ckptavg.files import (
    FolderLock,
    SnapshotReader,
    atomic_write,
    atomic_write_json,
    read_json,
    safetensors_metadata,
    snapshot_metadata,
    write_snapshot,
)
from ckptavg.layout import Layout


def _layout_and_buffers():
    layout = Layout.from_tensors({"w": torch.zeros(3, 4), "h": torch.zeros(5, dtype=torch.bfloat16)})
    buffers = layout.new_buffers()
    views = layout.views(buffers)
    views["w"].copy_(torch.arange(12.0).view(3, 4))
    views["h"].copy_(torch.arange(5.0))
    return layout, buffers


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    target = tmp_path / "elsewhere"
    (tmp_path / "model.bin.tmp").symlink_to(target)  # planted: replaced, never written through
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and not target.exists()
    atomic_write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2]}


def test_a_snapshot_file_is_safetensors_and_its_reader_verifies_size_header_and_checksums(tmp_path):
    from safetensors.torch import load_file

    layout, buffers = _layout_and_buffers()
    path = tmp_path / "step_5.safetensors"
    record = write_snapshot(path, layout, buffers, snapshot_metadata(5))
    loaded = load_file(path)
    assert torch.equal(loaded["w"], torch.arange(12.0).view(3, 4)) and loaded["h"].dtype == torch.bfloat16
    reader = SnapshotReader(path, layout, record)
    out = torch.empty(12)
    reader.read(torch.float32, 0, 12, out)
    assert out.tolist() == list(range(12)) and reader.verified_groups() == [torch.float32]
    reader.close()

    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the bf16 data
    path.write_bytes(bytes(data))
    reader = SnapshotReader(path, layout, record)
    with pytest.raises(CorruptSnapshotError, match="checksum mismatch in its"):
        reader.read(torch.bfloat16, 0, 5, torch.empty(5, dtype=torch.bfloat16))
    reader.close()
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(CorruptSnapshotError, match=r"truncated\?"):
        SnapshotReader(path, layout, record)
    path.unlink()
    with pytest.raises(CorruptSnapshotError, match="the file is missing"):
        SnapshotReader(path, layout, record)


def test_metadata_says_format_pt_and_the_kind():
    metadata = safetensors_metadata("merged", method="sma", steps=json.dumps([1, 2]))
    assert metadata["format"] == "pt" and metadata["ckptavg"] == "merged" and metadata["method"] == "sma"


def test_the_folder_lock_admits_one_writer(tmp_path):
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    first.acquire()
    with pytest.raises(FolderLockedError):
        second.acquire()
    first.release()
    second.acquire()
    assert second.held
    second.release()
