"""Textual-inversion embeddings bundled in network files (kohya's ``bundle_emb.NAME.…`` keys): parsed by the engine
as the WebUI's built-in Lora parses them, reported with the networks that bring them."""
from __future__ import annotations

import torch

import lib_lora
import lorafiles
import models
from lib_lora.activation import Activator, Settings
from lib_lora.catalog import Catalog
from lib_lora.summary import file_summary
from lib_lora.prompt import parse_items


def _lora() -> dict[str, torch.Tensor]:
    return lorafiles.random_kohya_lora(models.sd_model("sd1"), rank=2)


def test_one_and_two_text_encoder_embeddings():
    g = torch.Generator().manual_seed(0)
    sd = _lora()
    sd["bundle_emb.inkstyle.string_to_param.*"] = torch.randn(3, 32, generator=g)
    sd["bundle_emb.xlstyle.clip_l"] = torch.randn(2, 32, generator=g)
    sd["bundle_emb.xlstyle.clip_g"] = torch.randn(2, 48, generator=g)
    sd["bundle_emb.single.string_to_param.*"] = torch.randn(32, generator=g)  # one vector, stored flat
    net = lib_lora.from_state_dict(sd)
    assert set(net.embeddings) == {"inkstyle", "xlstyle", "single"} and not net.unmatched
    assert torch.equal(net.embeddings["inkstyle"].vectors["*"], sd["bundle_emb.inkstyle.string_to_param.*"])
    assert net.embeddings["xlstyle"].shape == 80 and set(net.embeddings["xlstyle"].vectors) == {"clip_l", "clip_g"}
    assert net.embeddings["single"].vectors["*"].shape == (1, 32)
    assert net.base_model == "sd1" and len(net.modules) == len(_lora()) // 3  # the network itself is unchanged


def test_broken_embeddings_are_reported_and_left_out():
    sd = _lora()
    sd["bundle_emb.half.clip_l"] = torch.zeros(2, 32)                       # clip_g missing
    sd["bundle_emb.uneven.clip_l"], sd["bundle_emb.uneven.clip_g"] = torch.zeros(2, 32), torch.zeros(3, 48)
    sd["bundle_emb.ints.string_to_param.*"] = torch.zeros(2, 32, dtype=torch.int64)
    sd["bundle_emb.cube.string_to_param.*"] = torch.zeros(1, 2, 32)
    net = lib_lora.from_state_dict(sd)
    assert net.embeddings == {} and len(net.modules) == len(_lora()) // 3
    assert set(net.unmatched) == {"bundle_emb.half", "bundle_emb.uneven", "bundle_emb.ints", "bundle_emb.cube"}
    assert "clip_l and clip_g" in net.unmatched["bundle_emb.half"]
    assert "different numbers of vectors" in net.unmatched["bundle_emb.uneven"]


def test_a_file_of_embeddings_only(tmp_path):
    path = lorafiles.save(tmp_path / "only.safetensors", {"bundle_emb.tok.string_to_param.*": torch.ones(2, 32)})
    net = lib_lora.load(path)
    assert net.modules == {} and list(net.embeddings) == ["tok"] and net.base_model is None
    assert file_summary(path)["embeddings"] == ["tok"]


def test_the_report_names_each_embedding_with_its_network_as_written_in_the_prompt(tmp_path):
    a = _lora() | {"bundle_emb.tok.string_to_param.*": torch.ones(1, 32)}
    b = _lora() | {"bundle_emb.tok.string_to_param.*": torch.zeros(1, 32), "bundle_emb.other.string_to_param.*": torch.ones(1, 32)}
    lorafiles.save(tmp_path / "first.safetensors", a, {"ss_output_name": "first_alias"})
    lorafiles.save(tmp_path / "second.safetensors", b)
    catalog = Catalog([str(tmp_path)])
    catalog.refresh()
    rep = Activator(catalog).build([parse_items(["first_alias", "1"]), parse_items(["second", "0.5"])], "sd1",
                                   "a tok", Settings())
    assert {name: (net.name, label) for name, (net, label) in rep.embeddings.items()} == {
        "tok": ("first", "first_alias"), "other": ("second", "second")}
    assert rep.warnings == ["second: its embedding tok is not used; first_alias brings one of that name"]
