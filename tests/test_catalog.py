"""The catalog of a Lora folder: hashes shared with the WebUI's cache in its format, hash lookups that answer at
once while a background thread hashes, and name lookups through indexes."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import lorafiles
from lib_lora import hashes
from lib_lora.catalog import Catalog


def tiny(path, seed=0, metadata=None):
    g = torch.Generator().manual_seed(seed)
    sd = {"lora_unet_out_2.lora_up.weight": torch.randn(4, 2, generator=g),
          "lora_unet_out_2.lora_down.weight": torch.randn(2, 320, 3, 3, generator=g)}
    return lorafiles.save(path, sd, metadata or {})


@pytest.fixture
def folder(tmp_path):
    tiny(tmp_path / "alpha.safetensors", 1)
    (tmp_path / "sub").mkdir()
    tiny(tmp_path / "sub" / "beta.safetensors", 2)
    tiny(tmp_path / "sub" / "alpha.safetensors", 3)  # the same file name as the top one
    tiny(tmp_path / "kohya.safetensors", 4, {"sshs_model_hash": "f" * 64})
    return tmp_path


def wait_hashed(catalog, timeout=60):
    deadline = time.monotonic() + timeout
    while catalog.hashing() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not catalog.hashing()


def test_hashes_are_shared_with_the_webui_cache_in_its_format(folder):
    beta = str(folder / "sub" / "beta.safetensors")
    webui = {"lora/beta": {"mtime": os.path.getmtime(beta) + 1, "sha256": "ab" * 32}}  # as the built-in wrote it
    written = []
    catalog = Catalog([str(folder)], hash_cache=webui, caches_written=lambda: written.append(1))
    catalog.refresh()
    assert catalog.entries["sub/beta"].hash == "ab" * 32, "a hash the WebUI computed is used, not recomputed"
    assert catalog.entries["kohya"].hash == "f" * 64, "kohya's sshs_model_hash comes first"
    assert catalog.entries["alpha"].hash is None

    catalog.ensure_hash(catalog.entries["alpha"])
    catalog.ensure_hash(catalog.entries["sub/alpha"])
    kohya = str(folder / "kohya.safetensors")
    webui["lora/kohya"] = {"mtime": os.path.getmtime(kohya), "sha256": "0" * 64}
    catalog.ensure_hash(catalog.entries["sub/beta"])
    catalog.refresh()
    assert catalog.entries["kohya"].hash == "f" * 64
    # two files named "alpha": the built-in's key "lora/alpha" could mean either, so neither uses it
    for path in (folder / "alpha.safetensors", folder / "sub" / "alpha.safetensors"):
        assert webui[f"lora/{path}"] == {"mtime": os.path.getmtime(path), "sha256": hashes.addnet_hash(str(path))}
    assert "lora/alpha" not in webui and set(webui) == {"lora/beta", "lora/kohya"} | {f"lora/{p}" for p in (
        folder / "alpha.safetensors", folder / "sub" / "alpha.safetensors")}
    assert written, "the WebUI's dump_cache is called after a write"

    again = Catalog([str(folder)], hash_cache=webui)
    again.refresh()
    assert again.entries["sub/alpha"].hash == hashes.addnet_hash(str(folder / "sub" / "alpha.safetensors"))

    os.utime(beta, (time.time() + 100, time.time() + 100))  # changed since: the cached hash is stale
    again.refresh()
    assert again.entries["sub/beta"].hash is None


def test_hash_lookup_answers_at_once_and_hashes_in_the_background(folder, monkeypatch):
    release = threading.Event()
    calls = []

    def slow_hash(path):
        calls.append(path)
        release.wait(30)
        return hashes.addnet_hash(path)

    monkeypatch.setattr(hashes, "webui_hash", slow_hash)
    catalog = Catalog([str(folder)])
    catalog.refresh()
    target = hashes.addnet_hash(str(folder / "sub" / "beta.safetensors"))

    t0 = time.monotonic()
    hit, pending = catalog.by_hash(target[:12])
    entry, note = catalog.resolve("0123456789ab")
    assert time.monotonic() - t0 < 5, "the lookup waited for hashing"
    assert hit is None and {e.relpath for e in pending} == {"alpha", "sub/alpha", "sub/beta"}
    assert entry is None and "3 file(s) are still being hashed" in note and "sub/beta" in note

    release.set()
    wait_hashed(catalog)
    assert len(calls) == 3, "each file is hashed once, on the one background thread"
    hit, pending = catalog.by_hash(target[:12])
    assert hit is catalog.entries["sub/beta"] and pending == []
    assert catalog.resolve(target[:10])[0] is hit
    assert catalog.resolve("0123456789ab") == (None, None)


def test_lookups_use_indexes(folder):
    catalog = Catalog([str(folder)])
    catalog.refresh()
    assert catalog.resolve("sub/beta")[0].relpath == "sub/beta"
    assert catalog.resolve("beta.safetensors")[0].relpath == "sub/beta"
    assert catalog.resolve("alpha") == (catalog.entries["alpha"], None), "a path is exact, never ambiguous"
    assert catalog.resolve("nothing") == (None, None)


def test_headers_are_read_once_per_file_version(folder, monkeypatch):
    import lib_lora.catalog
    kept = {}
    first = Catalog([str(folder)], file_cache=kept)
    first.refresh()
    assert set(kept) == {str(p) for p in folder.rglob("*.safetensors")}
    facts = {rel: (e.metadata, e.structure) for rel, e in first.entries.items()}
    assert facts["kohya"][0] == {"sshs_model_hash": "f" * 64} and facts["kohya"][1].kind == "LoCon"

    real = lib_lora.catalog.read_listing
    read = []
    monkeypatch.setattr(lib_lora.catalog, "read_listing", lambda path, limits: read.append(path) or real(path, limits))
    again = Catalog([str(folder)], file_cache=kept)  # a restart with the WebUI's cache
    again.refresh()
    assert read == [] and {rel: (e.metadata, e.structure) for rel, e in again.entries.items()} == facts
    tiny(folder / "sub" / "beta.safetensors", 9, {"ss_output_name": "renamed"})
    os.utime(folder / "sub" / "beta.safetensors", (time.time() + 10, time.time() + 10))
    again.refresh()
    assert read == [str(folder / "sub" / "beta.safetensors")] and again.entries["sub/beta"].alias == "renamed"


def test_files_of_one_make_share_one_structure(tmp_path, monkeypatch):
    """A library's files come from a few trainer settings: the structure of a make (names, shapes, the metadata
    naming a base model) is worked out once; another rank or base model is a make of its own."""
    import lib_lora.structure
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        tiny(tmp_path / f"{name}.safetensors", seed)
    g = torch.Generator().manual_seed(4)
    lorafiles.save(tmp_path / "rank3.safetensors", {"lora_unet_out_2.lora_up.weight": torch.randn(4, 3, generator=g),
                                                    "lora_unet_out_2.lora_down.weight": torch.randn(3, 320, 3, 3, generator=g)}, {})
    tiny(tmp_path / "xl.safetensors", 5, {"ss_base_model_version": "sdxl_base_v1-0"})
    real = lib_lora.structure._structure
    worked = []
    monkeypatch.setattr(lib_lora.structure, "_makes", type(lib_lora.structure._makes)())
    monkeypatch.setattr(lib_lora.structure, "_structure", lambda shapes, metadata: worked.append(shapes) or real(shapes, metadata))
    catalog = Catalog([str(tmp_path)])
    catalog.refresh()
    assert len(worked) == 3
    s = {rel: e.structure for rel, e in catalog.entries.items()}
    assert s["a"] == s["b"] == s["c"] and (s["a"].rank, s["rank3"].rank) == (2, 3)
    assert s["a"].base_model is None and s["xl"].base_model == "sdxl"


def test_listing_leaves_tensor_checks_to_the_first_use(tmp_path):
    """A scan checks a header's size, JSON and metadata; each tensor's entry is checked when the file is loaded,
    and a problem found then is on the card from then on, also after a restart."""
    import json
    import struct

    from lib_lora import LoraError

    def write(name, doc, data=b""):
        raw = json.dumps(doc).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    up = {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}
    write("overlap.safetensors", {"lora_unet_out_2.lora_up.weight": up, "lora_unet_out_2.lora_down.weight":
                                  {"dtype": "F32", "shape": [2, 4], "data_offsets": [16, 48]}}, b"\0" * 48)
    write("shapeless.safetensors", {"lora_unet_out_2.lora_up.weight": up, "lora_unet_out_2.lora_down.weight":
                                    {"dtype": "F32", "shape": "2x4", "data_offsets": [32, 64]}}, b"\0" * 64)
    write("no_shape.safetensors", {"lora_unet_out_2.lora_up.weight": {"dtype": "F32", "data_offsets": [0, 32]}}, b"\0" * 32)
    kept = {}
    catalog = Catalog([str(tmp_path)], file_cache=kept)
    catalog.refresh()
    entries = catalog.entries
    assert entries["overlap"].metadata_error is None and entries["overlap"].structure.kind == "LoRA"
    assert "invalid shape" in entries["shapeless"].metadata_error and "shapeless.safetensors" in entries["shapeless"].metadata_error
    assert "invalid shape" in entries["no_shape"].metadata_error
    with pytest.raises(LoraError, match="overlap in the file"):
        catalog.load(entries["overlap"])
    assert "overlap in the file" in entries["overlap"].metadata_error and entries["overlap"].structure.kind is None
    restarted = Catalog([str(tmp_path)], file_cache=kept)
    restarted.refresh()
    assert restarted.entries["overlap"].metadata_error == entries["overlap"].metadata_error


def test_links_are_listed_only_when_they_stay_in_the_folder(folder, tmp_path_factory):
    """A linked file inside the folder is listed under its link's name; a link leading out of the folder, a dangling
    link and a linked folder are not followed (a user's folder must not expose other files to the page and API)."""
    outside = tmp_path_factory.mktemp("outside")
    tiny(outside / "secret.safetensors", 9)
    (outside / "deep").mkdir()
    tiny(outside / "deep" / "hidden.safetensors", 10)
    os.symlink(folder / "sub" / "beta.safetensors", folder / "beta_link.safetensors")
    os.symlink(outside / "secret.safetensors", folder / "escape.safetensors")
    os.symlink(folder / "missing.safetensors", folder / "dangling.safetensors")
    os.symlink(outside / "deep", folder / "linked_dir")
    os.mkfifo(folder / "pipe.safetensors")
    catalog = Catalog([str(folder)])
    catalog.refresh()
    assert sorted(catalog.entries) == ["alpha", "beta_link", "kohya", "sub/alpha", "sub/beta"]
    link = catalog.entries["beta_link"]
    assert link.name == "beta_link" and link.size == os.path.getsize(folder / "sub" / "beta.safetensors")
