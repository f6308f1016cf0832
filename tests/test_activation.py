"""Advice and defaults decided when a prompt's networks are resolved (engine side of the WebUI hook)."""
from __future__ import annotations

import json

import pytest

import lorafiles
import models
from lib_lora.activation import Activator, Settings
from lib_lora.catalog import Catalog
from lib_lora.prompt import parse_prompt


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    m = models.sd_model("sd1", seed=41)
    lorafiles.save(folder / "ink.safetensors", lorafiles.random_kohya_lora(m, rank=2, seed=1), {})
    (folder / "ink.json").write_text(json.dumps({"activation text": "inkstyle, monochrome", "preferred weight": 0.6}))
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    lorafiles.save(folder / "a" / "twin.safetensors", lorafiles.random_kohya_lora(m, rank=2, seed=2), {})
    (folder / "b" / "c").mkdir()
    lorafiles.save(folder / "b" / "c" / "twin.safetensors", lorafiles.random_kohya_lora(m, rank=2, seed=3), {})
    lorafiles.save(folder / "b" / "renamed.safetensors", lorafiles.random_kohya_lora(m, rank=2, seed=4),
                   {"ss_output_name": "original_name"})
    c = Catalog([str(folder)])
    c.refresh()
    return c


def build(catalog, prompt, **kw):
    _text, requests, _ = parse_prompt(prompt)
    return Activator(catalog).build(requests, "sd1", prompt, Settings(**kw))


def test_preferred_weight_from_the_card(catalog):
    rep = build(catalog, "a cat <lora:ink>")
    assert rep.uses[0].te == 0.6 and rep.uses[0].unet == 0.6
    assert build(catalog, "a cat <lora:ink:0.9>").uses[0].te == 0.9


def test_trigger_words_warn_add_or_ignore(catalog):
    assert any("trigger words" in w for w in build(catalog, "a cat <lora:ink:0.5>").warnings)
    assert not any("trigger words" in w for w in build(catalog, "inkstyle cat <lora:ink:0.5>").warnings)
    assert build(catalog, "a cat <lora:ink:0.5>", trigger_words="add").add_to_prompt == ["inkstyle, monochrome"]
    rep = build(catalog, "a cat <lora:ink:0.5>", trigger_words="ignore")
    assert not rep.warnings and not rep.add_to_prompt


def test_weight_limit_warning(catalog):
    assert any("above 1" in w for w in build(catalog, "<lora:ink:1.5>").warnings)
    assert not any("above" in w for w in build(catalog, "<lora:ink:1.5>", weight_limit=2.0).warnings)


def test_names_shortest_path_wins_and_warns(catalog):
    rep = build(catalog, "<lora:twin:0.5>")
    assert rep.uses[0].network.path.endswith("a/twin.safetensors")
    assert any("ambiguous" in w for w in rep.warnings)
    assert build(catalog, "<lora:b/c/twin:0.5>").uses[0].network.path.endswith("b/c/twin.safetensors")


def test_alias_follows_the_setting(catalog):
    assert build(catalog, "<lora:original_name:0.5>").uses[0].network.name == "renamed"
    assert build(catalog, "<lora:original_name:0.5>", prefer_alias=False).errors == ["Lora not found: original_name"]


def test_unknown_and_hash_names(catalog):
    rep = build(catalog, "<lora:missing:1>")
    assert rep.errors == ["Lora not found: missing"] and not rep.uses
    entry, _ = catalog.resolve("ink")
    short = catalog.ensure_hash(entry)[:12]
    rep = build(catalog, f"<lora:{short}:1>")
    assert rep.uses and rep.uses[0].network.name == "ink" and rep.hashes == {short: short}


def test_block_weights_from_the_presets_in_force(catalog):
    from lib_lora.block_presets import BlockPresets
    presets = BlockPresets().updated("MINE:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0.5", "TE:BASE::0.25")
    rep = build(catalog, "<lora:ink:0.5:MINE:TE> <lora:ink:1:lbw=NOPE> <lora:ink:lbwe=NOPE>", presets=presets)
    assert len(rep.uses) == 1 and rep.uses[0].blocks.values["OUT11"] == 0.5 and rep.uses[0].blocks.family == "sd1"
    assert rep.uses[0].blocks.multiplier("te", "text_model_encoder_layers_0_mlp_fc1") == 0.25
    assert [e.split(":")[0] for e in rep.errors] == ["ink", "ink"]
    assert "unknown block-weight preset 'NOPE'" in rep.errors[0] and "unknown elemental preset 'NOPE'" in rep.errors[1]
