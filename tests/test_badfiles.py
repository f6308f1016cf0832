"""A corpus of broken and hostile files built here: each is refused with one message naming the file and
the reason, nothing else escapes, nothing runs, and the model stays bit-identical."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save

import lib_lora
import lorafiles
import models
from helpers import same_state, state
from lib_lora import LoraError


@pytest.fixture(scope="module")
def model():
    return models.sd_model("sd1", seed=21)


@pytest.fixture(scope="module")
def good_sd(model):
    return lorafiles.random_kohya_lora(model, rank=2)


def _header(doc: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(doc).encode()
    return struct.pack("<Q", len(raw)) + raw + data


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def corpus(tmp, good_sd, marker) -> dict[str, tuple[str, str]]:
    """name → (path, expected words in the message)."""
    files = {}
    good = st_save(good_sd)

    def put(name, payload: bytes, expect: str):
        p = tmp / name
        p.write_bytes(payload)
        files[name] = (str(p), expect)

    put("truncated.safetensors", good[: len(good) // 2], "truncated")
    put("header_past_end.safetensors", struct.pack("<Q", 10_000) + b"{}", "past the end")
    put("huge_header.safetensors", struct.pack("<Q", 2 ** 40) + b"{}", "over the")
    put("invalid_json.safetensors", struct.pack("<Q", 5) + b"{nope", "not valid JSON")
    put("header_is_list.safetensors", struct.pack("<Q", 6) + b"[1, 2]", "not a JSON object")
    put("overlap.safetensors", _header({"a.lora_up.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "a.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
        "overlap")
    put("wrong_dtype_size.safetensors", _header({"x.alpha": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "needs 12 bytes")
    put("unknown_dtype.safetensors", _header({"x.alpha": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        "unknown dtype")
    put("negative_offsets.safetensors", _header({"x.alpha": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}}, b"\0"),
        "outside the file")
    put("bad_metadata.safetensors", _header({"__metadata__": {"a": 1}}), "map of strings")
    put("empty.safetensors", b"", "only 0 bytes")
    nan = dict(good_sd)
    k = next(iter(nan))
    nan[k] = nan[k].clone()
    nan[k].view(-1)[0] = float("nan")
    put("nan.safetensors", st_save(nan), "NaN")
    inf = dict(good_sd)
    inf[k] = inf[k].clone()
    inf[k].view(-1)[0] = float("inf")
    put("inf.safetensors", st_save(inf), "infinite")
    put("zero_size.safetensors", st_save({"lora_unet_out_2.lora_up.weight": torch.zeros(4, 0),
                                          "lora_unet_out_2.lora_down.weight": torch.zeros(0, 4)}), "no usable")
    rank = {"lora_unet_time_embed_0.lora_up.weight": torch.zeros(128, 3),
            "lora_unet_time_embed_0.lora_down.weight": torch.zeros(2, 32)}
    put("rank_mismatch.safetensors", st_save(rank), "rank mismatch")
    put("unknown_suffixes.safetensors", st_save({"foo.bar": torch.zeros(2), "model.baz": torch.zeros(1)}), "no LoRA keys")
    put("png_renamed.safetensors", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "")
    put("text_renamed.pt", b"hello, this is not a torch file", "not a readable torch file")
    buf = io.BytesIO()
    pickle.dump(Evil(marker), buf)
    put("evil_pickle.pt", buf.getvalue(), "")
    buf = io.BytesIO()
    torch.save({"lora_unet_out_2.lora_up.weight": torch.zeros(4, 2), "payload": Evil(marker)}, buf)
    put("zip_with_object.ckpt", buf.getvalue(), "refused to unpickle")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(marker)))
    put("zip_evil.ckpt", buf.getvalue(), "")
    put("wrong_suffix.txt", good, "unsupported file type")
    return files


def test_corpus_is_refused_cleanly(tmp_path, model, good_sd):
    marker = tmp_path / "PWNED"
    files = corpus(tmp_path, good_sd, marker)
    assert len(files) >= 20
    ref = state(model)
    for name, (path, expect) in files.items():
        with pytest.raises(LoraError) as err:
            lib_lora.load(path)
        msg = err.value.message
        assert path in msg, (name, msg)
        assert expect.lower() in msg.lower(), (name, msg)
        assert "(" in msg, f"{name}: the message should say what to do: {msg}"
    assert not marker.exists(), "unpickling ran code"
    assert same_state(model, ref)


def test_memory_mapped_reading_refuses_the_same_files(tmp_path, good_sd):
    """The tools read checkpoints through a memory map: every check happens before it, with the same message."""
    from lib_lora.safetensors_io import read_state_dict

    def outcome(path, mapped):
        try:
            tensors, _ = read_state_dict(path, mapped=mapped)
        except LoraError as e:
            return e.message
        return {k: (t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy())) for k, t in tensors.items()}

    marker = tmp_path / "PWNED"
    for name, (path, _expect) in corpus(tmp_path, good_sd, marker).items():
        assert outcome(path, True) == outcome(path, False), name
    assert not marker.exists(), "unpickling ran code"


def test_size_limits_refuse_before_reading(tmp_path, good_sd):
    p = lorafiles.save(tmp_path / "big.safetensors", good_sd)
    with pytest.raises(LoraError, match="over the 1000-byte limit"):
        lib_lora.load(p, limits=lib_lora.Limits(max_file_bytes=1000))
    with pytest.raises(LoraError, match="header claims"):
        lib_lora.load(p, limits=lib_lora.Limits(max_header_bytes=100))


def test_other_family_keys_are_rejected_at_apply(model):
    ref = state(model)
    xl = lib_lora.from_state_dict(lorafiles.random_kohya_lora(models.sdxl_skeleton(seed=1), rank=2, sdxl=True))
    res = lib_lora.Patcher(model).apply([lib_lora.Use(xl)])
    assert res.errors and "SDXL" in res.errors[0]
    assert same_state(model, ref)


def test_shape_mismatch_is_skipped_not_raised(model):
    ref = state(model)
    sd = {"lora_unet_time_embed_0.lora_up.weight": torch.randn(7, 2), "lora_unet_time_embed_0.lora_down.weight": torch.randn(2, 5)}
    p = lib_lora.Patcher(model)
    res = p.apply([lib_lora.Use(lib_lora.from_state_dict(sd))])
    assert "fit" in res.skipped["lora_unet_time_embed_0"] and res.matched == []
    assert same_state(model, ref)
