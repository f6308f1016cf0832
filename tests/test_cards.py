"""Card data for the Lora page (lib_lora.cards): badges from header shapes, civitai.info, tags, search, names."""
from __future__ import annotations

import json

import pytest
import torch

from lib_lora import cards
from lib_lora.catalog import Catalog
from lorafiles import save

UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def lora(rank: int, conv3: bool = False, dora: bool = False) -> dict[str, torch.Tensor]:
    sd = {f"{UNET}.lora_down.weight": torch.zeros(rank, 768), f"{UNET}.lora_up.weight": torch.zeros(320, rank),
          f"{UNET}.alpha": torch.tensor(float(rank)),
          f"{TE}.lora_down.weight": torch.zeros(rank, 768), f"{TE}.lora_up.weight": torch.zeros(768, rank)}
    if conv3:
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        sd[f"{conv}.lora_down.weight"] = torch.zeros(rank, 320, 3, 3)
        sd[f"{conv}.lora_up.weight"] = torch.zeros(320, rank, 1, 1)
    if dora:
        sd[f"{UNET}.dora_scale"] = torch.ones(1, 768)
    return sd


def loha(rank: int) -> dict[str, torch.Tensor]:
    return {f"{UNET}.hada_w1_a": torch.zeros(320, rank), f"{UNET}.hada_w1_b": torch.zeros(rank, 768),
            f"{UNET}.hada_w2_a": torch.zeros(320, rank), f"{UNET}.hada_w2_b": torch.zeros(rank, 768)}


def lokr() -> dict[str, torch.Tensor]:
    return {f"{UNET}.lokr_w1": torch.zeros(4, 8), f"{UNET}.lokr_w2_a": torch.zeros(80, 2), f"{UNET}.lokr_w2_b": torch.zeros(2, 96)}


def entry_for(tmp_path, name: str, sd: dict, metadata: dict | None = None):
    save(tmp_path / f"{name}.safetensors", sd, metadata)
    catalog = Catalog([str(tmp_path)])
    catalog.refresh()
    return catalog, catalog.entries[name]


@pytest.mark.parametrize("sd,kind,rank,large,base", [
    (lora(16), "LoRA", 16, False, "sd1"),  # 768-wide text-encoder and cross-attention inputs
    (lora(32), "LoRA", 32, True, "sd1"),
    (lora(8, conv3=True), "LoCon", 8, False, "sd1"),
    (lora(8, dora=True), "DoRA", 8, False, "sd1"),
    (loha(4), "LoHa", 4, False, "sd1"),
    (lokr(), "LoKr", 2, False, None),  # nothing in its shapes tells
])
def test_kind_and_rank_from_header_shapes(tmp_path, monkeypatch, sd, kind, rank, large, base):
    import lib_lora.network
    import lib_lora.safetensors_io
    _, entry = entry_for(tmp_path, "net", sd)

    def refuse(*a, **k):
        raise AssertionError("a card must not read tensor data")
    monkeypatch.setattr(lib_lora.safetensors_io, "load_safetensors", refuse)
    monkeypatch.setattr(lib_lora.network, "load", refuse)
    s = cards.structure(entry)
    assert (s.kind, s.rank, s.large, s.error, s.base_model) == (kind, rank, large, None, base)


def test_structure_of_sdxl_and_broken_files(tmp_path):
    xl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)}
    _, entry = entry_for(tmp_path, "xl", xl)
    assert cards.structure(entry).base_model == "sdxl"
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    catalog = Catalog([str(tmp_path)])
    catalog.refresh()
    broken = cards.structure(catalog.entries["broken"])
    assert broken.kind is None and "not valid JSON" in broken.error


def write_info(tmp_path, data) -> str:
    (tmp_path / "net.civitai.info").write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf8")
    return str(tmp_path / "net.safetensors")


def test_civitai_info(tmp_path):
    path = write_info(tmp_path, {"trainedWords": ["inkstyle, monochrome", "inkstyle"], "baseModel": "Pony",
                                 "description": "<p>Ink &amp; wash.</p><p>Second</p>", "images": [{"url": "https://x/y.png"}]})
    info, problem = cards.read_civitai(path)
    assert problem is None
    assert info.trained_words == ("inkstyle", "monochrome")
    assert (info.base_model, info.base_label) == ("sdxl", "Pony")
    assert info.description == "Ink & wash.\nSecond"
    assert [cards.civitai_family(x) for x in ("SD 1.5", "SD 2.1 768", "SDXL 1.0", "Flux.1 D")] == ["sd1", "sd2", "sdxl", None]


def test_corrupt_civitai_info_is_reported_not_raised(tmp_path):
    info, problem = cards.read_civitai(write_info(tmp_path, "{oops"))
    assert info == cards.Civitai() and "unreadable" in problem
    assert cards.read_civitai(str(tmp_path / "other.safetensors")) == (cards.Civitai(), None)


def test_user_values_win_over_civitai_and_structure():
    civ = cards.Civitai(base_model="sdxl", description="from civitai")
    assert cards.base_model({"sd version": "SD2"}, "sd1", civ) == "sd2"
    assert cards.base_model({"sd version": "Unknown"}, "sd1", civ) == "sd1"
    assert cards.base_model({}, None, civ) == "sdxl"
    assert cards.description({"description": "mine"}, civ) == "mine"
    assert cards.description({"description": ""}, civ) == "from civitai"


def test_filter_by_base_model():
    assert cards.fits("sdxl", "sd1", show_all=True)
    assert not cards.fits("sdxl", "sd1", show_all=False)
    assert cards.fits("sd1", "sd1") and cards.fits(None, "sd1") and cards.fits("sdxl", None)
    assert not cards.fits(None, "sdxl", hide_unknown_for=["SDXL"]) and cards.fits(None, "sd1", hide_unknown_for=["SDXL"])


FREQ = {"ss_tag_frequency": json.dumps({"10_ink": {"ink": 10, " monochrome": 4}, "5_more": {"ink": 2, "sketch": 7}})}


def test_tags_and_suggestions():
    assert cards.tag_counts(FREQ) == [("ink", 12), ("sketch", 7), ("monochrome", 4)]
    civ = cards.Civitai(trained_words=("inkstyle", "ink"))
    assert cards.suggestions(FREQ, civ) == [("inkstyle", "civitai"), ("ink", "civitai"), ("sketch", "7"), ("monochrome", "4")]
    sentences = {"ss_tag_frequency": json.dumps({"a": {"a photo of a red fox in the snow": 3, "a red fox sleeping at night": 2}})}
    assert cards.tag_counts(sentences)[:2] == [("fox", 5), ("red", 5)]
    assert cards.tag_counts({"ss_tag_frequency": "not json"}) == []
    assert cards.toggle_word("ink, sketch", "mono") == "ink, sketch, mono"
    assert cards.toggle_word("ink, sketch", "ink") == "sketch"


def test_search_terms_and_prompt_names(tmp_path):
    save(tmp_path / "ink.safetensors", lora(4), {"ss_output_name": "ink_v2", **FREQ})
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub" / "ink.safetensors", lora(4))
    save(tmp_path / "solo.safetensors", lora(4))
    catalog = Catalog([str(tmp_path)])
    catalog.refresh()
    top, nested, solo = catalog.entries["ink"], catalog.entries["sub/ink"], catalog.entries["solo"]
    terms = cards.search_terms(top, {"activation text": "inkstyle"}, cards.Civitai(trained_words=("inky",)),
                               cards.structure(top), "sd1")
    for term in ("ink", "ink_v2", "inkstyle", "inky", "sketch", "SD1", "base:sd1", "LoRA"):
        assert term in terms
    assert cards.prompt_name(catalog, top, prefer_alias=True) == "ink_v2"
    assert cards.prompt_name(catalog, top, prefer_alias=False) == "ink"
    assert cards.prompt_name(catalog, nested, prefer_alias=True) == "sub/ink"  # "ink" would pick the other file
    assert cards.prompt_name(catalog, solo, prefer_alias=True) == "solo"


def test_preview_order():
    present = {"/m/net.preview.png", "/m/net.jpg", "/m/net.png"}
    assert cards.preview_path("/m/net", present.__contains__) == "/m/net.png"
    present.discard("/m/net.png")
    assert cards.preview_path("/m/net", present.__contains__) == "/m/net.preview.png"
    assert cards.preview_path("/m/other", present.__contains__) is None


def test_training_rows():
    meta = {"ss_network_dim": "32", "ss_network_alpha": "16", "ss_base_model_version": "sd_v1", "ss_num_epochs": "10",
            "ss_max_train_steps": "1500", "ss_resolution": "(512, 512)", "ss_clip_skip": "None",
            "ss_training_started_at": "1700000000",
            "ss_dataset_dirs": json.dumps({"10_ink": {"n_repeats": 10, "img_count": 15}})}
    rows = dict(cards.training_rows(meta))
    assert rows["Dim / alpha"] == "32 / 16" and rows["Epochs"] == "10" and rows["Max steps"] == "1500"
    assert rows["Resolution"] == "512x512" and "Clip skip" not in rows
    assert rows["Dataset folders"] == "10_ink (15 images × 10 repeats)"
    assert rows["Training started"].startswith("2023-11-14")


def test_weight_prompts():
    prompts = cards.weight_prompts("a cat <lora:ink:0.3> <lora:other:1>", "ink_v2", "inkstyle", lambda n: n in ("ink", "ink_v2"))
    assert prompts[0] == "a cat  <lora:other:1> <lora:ink_v2:0>, inkstyle"
    assert [p.split("<lora:ink_v2:")[1].split(">")[0] for p in prompts] == ["0", "0.25", "0.5", "0.75", "1"]
    assert cards.weight_prompts("inkstyle, a cat", "ink", "inkstyle", lambda n: False)[-1] == "inkstyle, a cat <lora:ink:1>"
