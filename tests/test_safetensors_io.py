"""Reading and writing safetensors without a second copy: the same tensors as the safetensors library reads, the
same bytes as it writes; memory-mapped reads never change the file; pickles stay weights-only when mapped."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from lib_lora import LoraError
from lib_lora.safetensors_io import (load_pickled, load_safetensors, map_safetensors, read_header, read_state_dict,
                                     save_safetensors)


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.f32": torch.randn(3, 5, generator=g),
        "a.f16": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "d.i64": torch.arange(5),
        "e.u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(2.5),
        "h.empty": torch.zeros(0, 4),
        "ünïcode.key": torch.ones(2, dtype=torch.float64),
        "i.strided": torch.randn(4, 6, generator=g).t(),
    }


def split(raw: bytes) -> tuple[list, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return list(json.loads(raw[8:8 + n]).items()), raw[8 + n:]


@pytest.mark.parametrize("metadata", [None, {"ss_output_name": "x", "note": "ünï \"quoted\"\n\x01"}])
def test_writes_what_the_safetensors_library_writes(tmp_path, metadata):
    """The same bytes (metadata keys: the library's order differs between its versions; ours is sorted)."""
    tensors = mixed_tensors()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(str(ours), tensors, metadata)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(theirs), metadata)
    if metadata is None:
        assert ours.read_bytes() == theirs.read_bytes()
    else:
        (meta, *ours_header), ours_data = split(ours.read_bytes())
        (their_meta, *their_header), their_data = split(theirs.read_bytes())
        assert meta == their_meta == ("__metadata__", metadata)
        assert ours_header == their_header and ours_data == their_data


@pytest.mark.parametrize("reader", [load_safetensors, map_safetensors])
def test_reads_what_the_library_reads(tmp_path, reader):
    path = tmp_path / "x.safetensors"
    save_file({k: t.contiguous() for k, t in mixed_tensors().items()}, str(path), {"k": "v"})
    tensors, metadata = reader(str(path))
    ref = load_file(str(path))
    assert metadata == {"k": "v"} and list(tensors) == list(read_header(str(path)).tensors) and set(tensors) == set(ref)
    for key, t in ref.items():
        assert tensors[key].dtype == t.dtype and tensors[key].shape == t.shape and torch.equal(tensors[key], t), key


def test_a_mapped_tensor_changed_in_memory_leaves_the_file_alone(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.w": torch.ones(256, 256), "x": torch.zeros(3)}, str(path))
    before = path.read_bytes()
    tensors, _ = map_safetensors(str(path))
    tensors["model.diffusion_model.w"].mul_(3)
    assert float(tensors["model.diffusion_model.w"][0, 0]) == 3.0
    out = tmp_path / "out.safetensors"
    save_safetensors(str(out), tensors)
    assert path.read_bytes() == before
    assert float(load_file(str(out))["model.diffusion_model.w"].mean()) == 3.0


def test_unaligned_tensors_are_read(tmp_path):
    """Offsets need not be multiples of the element size (the format does not require it)."""
    doc = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytes([1, 2, 3]) + struct.pack("<2f", 1.5, -2.0)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    for reader in (load_safetensors, map_safetensors):
        tensors, _ = reader(str(path))
        assert tensors["a"].tolist() == [1, 2, 3] and tensors["b"].tolist() == [1.5, -2.0]


def test_a_file_cut_after_its_header_was_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    path.write_bytes(save({"w": torch.ones(1000)}))
    import lib_lora.safetensors_io as io
    real = io.read_header

    def then_cut(p, limits=io.Limits()):
        header = real(p, limits)
        os.truncate(p, os.path.getsize(p) - 100)
        return header

    monkeypatch.setattr(io, "read_header", then_cut)
    for reader in (load_safetensors, map_safetensors):
        path.write_bytes(save({"w": torch.ones(1000)}))
        with pytest.raises(LoraError, match="changed while being read"):
            reader(str(path))


def test_mapped_pickles_are_weights_only(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.arange(6.0)}}, str(good))
    tensors, metadata = read_state_dict(str(good), mapped=True)
    assert metadata == {} and tensors["model.diffusion_model.w"].tolist() == [0, 1, 2, 3, 4, 5]
    tensors["model.diffusion_model.w"].zero_()
    assert load_pickled(str(good))["model.diffusion_model.w"].tolist() == [0, 1, 2, 3, 4, 5]

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"w": torch.zeros(2), "payload": Evil()}, str(evil))
    with pytest.raises(LoraError, match="refused to unpickle"):
        read_state_dict(str(evil), mapped=True)
    assert not (tmp_path / "PWNED").exists()
