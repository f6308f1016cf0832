"""sd-webui-lora-block-weight's (LBW's) prompt forms, presets files, elemental presets, schedules and XYZ plot give
the multipliers LBW's own functions give: tests/fixtures/lbw_reference.json, written by running LBW
(tests/fixtures/make_lbw_reference.py says how)."""
from __future__ import annotations

import itertools
import json
import pathlib
import random

import pytest

import models
from lib_lora.block_presets import BlockPresets, combined, inverted, parse_element_presets, parse_weight_presets, \
    xyz_cell
from lib_lora.blocks import BLOCKS26, BlockWeights, block_of, layer_name, parse_elements
from lib_lora.model_index import ModelIndex
from lib_lora.patcher import Use
from lib_lora.prompt import parse_prompt

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "lbw_reference.json").read_text(encoding="utf8"))
CASES = FIXTURE["cases"]


def case_id(case: dict) -> str:
    return case["prompt"] + (f" [{case['family']}]" if "family" in case else "") + (" (user presets)" if "weights" in case else "")


def ours(case: dict):
    """The request, and the block weights our engine resolves for it with the same presets and random seed."""
    _, requests, messages = parse_prompt(case["prompt"])
    assert not messages and len(requests) == 1
    req = requests[0]
    presets = BlockPresets().updated(case.get("weights"), case.get("elements"))
    return req, presets.block_weights(req.lbw, req.lbwe, req.x, case.get("family"), random.Random(case.get("seed", 0)))


@pytest.mark.parametrize("case", [c for c in CASES if "family" not in c and "steps" not in c], ids=case_id)
def test_prompt_forms_give_lbws_block_weights(case):
    req, bw = ours(case)
    want = case["lbw"]
    assert (req.te if req.te is not None else 1.0, req.unet if req.unet is not None else 1.0) == (want["te"], want["unet"])
    assert [bw.values[b] for b in BLOCKS26] == pytest.approx(want["ratios"][:26], abs=1e-12)
    assert bw.elements == parse_elements(want["elements"])


def test_every_default_preset_is_covered():
    covered = {c["prompt"].split("lbw=")[1].rstrip(">") for c in CASES if "lbw=" in c["prompt"] and "weights" not in c}
    assert set(parse_weight_presets("\n".join(f"{k}:{v}" for k, v in BlockPresets().weights.items()))) - covered \
        == {"XLNONE", "XLALL", "XLIN", "XLMID", "XLOUT"}  # ours, not LBW's


def layer_targets(family: str):
    """(part, path, sub) of every layer the engine can patch in the family's test model."""
    index = ModelIndex(models.sd_model(family))
    for (part, path), (name, _module) in index.modules.items():
        yield part, path, None
        if name in index.parent_mha.values():
            for sub in "qkv":
                yield part, path, sub


@pytest.fixture(scope="module")
def targets():
    return {family: list(layer_targets(family)) for family in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_layer_names_are_the_webuis(targets, family):
    """Every layer's name is the one the WebUI's built-in Lora gives it (the names LBW matches)."""
    assert sorted(layer_name(*t, family=family) for t in targets[family]) == FIXTURE["layers"][family]


@pytest.mark.parametrize("case", [c for c in CASES if "family" in c], ids=case_id)
def test_each_layer_gets_lbws_multiplier(targets, case):
    """Block of every layer (a vector of distinct values), and elemental directives, as LBW's lbw() scales them."""
    family = case["family"]
    names = FIXTURE["layers"][family]
    runs = case["lbw"]["layer_runs"]
    want = dict(zip(names, itertools.chain.from_iterable([v] * n for v, n in runs)))
    _, bw = ours(case)
    got = {layer_name(*t, family=family): bw.multiplier(*t) for t in targets[family]}
    wrong = {k: (got[k], want[k]) for k in names if abs(got[k] - want[k]) > 1e-6}
    assert not wrong, list(wrong.items())[:10]


@pytest.mark.parametrize("case", [c for c in CASES if "steps" in c], ids=case_id)
def test_schedules_switch_at_lbws_steps(case):
    """LBW's A1111 hook switches a network at the denoiser call our start=/stop= name (0-based)."""
    _, requests, _ = parse_prompt(case["prompt"])
    req = requests[0]
    assert (req.start, req.stop) == tuple(None if v is None else float(v) for v in (case["lbw"]["start"], case["lbw"]["stop"]))
    use = Use(_network(), start=req.start, stop=req.stop)
    steps = case["steps"]
    assert [1.0 if use.active_at(i, steps) else 0.0 for i in range(steps)] == case["lbw"]["unet_by_step"]


def _network():
    import lib_lora
    import torch
    return lib_lora.from_state_dict({"lora_unet_out_2.lora_down.weight": torch.zeros(1, 4, 3, 3),
                                     "lora_unet_out_2.lora_up.weight": torch.zeros(4, 1, 1, 1)})


AXES = {"values": "value", "Block ID": "blocks", "Original Weights": "originals"}


@pytest.mark.parametrize("plot", FIXTURE["xyz"], ids=lambda p: " / ".join(p["axes"][::2]))
def test_xyz_plot_cells_get_lbws_vectors(plot):
    presets = BlockPresets().updated(plot.get("weights"))
    types = dict(zip("xyz", plot["axes"][::2]))
    for cell in plot["cells"]:
        state = {"value": None, "blocks": None, "originals": ()}
        for axis in "xyz":
            kind = AXES.get(types[axis])
            if kind == "originals":
                state["originals"] += (cell[axis],)
            elif kind:
                state[kind] = cell[axis]
        vector = xyz_cell(presets, **state)
        assert vector == cell["xyz"], cell
        if cell["zyx"] is not None:
            assert inverted(vector) == cell["zyx"]


def test_preset_files_are_read_as_lbw_reads_them():
    weights = parse_weight_presets(FIXTURE["user_weights"])
    assert "BROKEN" not in weights and "SPACED" in weights and not any(k.startswith("#") for k in weights)
    elements = parse_element_presets(FIXTURE["user_elements"].replace("\n", "\r\n"))
    assert elements["ATTNDEEPOFF"] == "IN05-OUT05:attn:0\nBASE:mlp self_attn:0.5"


def test_user_presets_extend_and_replace_the_defaults():
    presets = BlockPresets().updated("ALL:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\nMINE:1,1,1,1,1,1,1,1,1,1,1,1")
    assert presets.weight_text("ALL").startswith("0,") and presets.weight_text("mine") and presets.weight_text("OUTS")
    assert presets.block_weights(None, None) is None
    assert presets.block_weights(None, "ATTNDEEPON").values == dict.fromkeys(BLOCKS26, 1.0)


@pytest.mark.parametrize("lbw,lbwe,words", [
    ("NOPE", None, "unknown block-weight preset 'NOPE'"),
    (None, "NOPE", "unknown elemental preset 'NOPE'"),
    ("1,2,3,4,5,6,7,8,9,10,11,R", None, None),
    ("1,2,3,4,5,6,7,8,9,10,11,X+", None, "needs a number"),
    ("1,2,3,4,5,6,7,8,9,10,11,nan", None, "finite"),
    ("1,2,3,4,5,6,7,8,9,10,11,", None, "not a number"),
])
def test_bad_block_weights_are_refused_with_a_reason(lbw, lbwe, words):
    presets = BlockPresets().updated(elements_text="BAD:IN99-OUT01:attn:1")
    if words is None:
        assert presets.block_weights(lbw, lbwe, rng=random.Random(0)).values["OUT05"] >= 0
        return
    with pytest.raises(ValueError, match=words.replace("+", r"\+")):
        presets.block_weights(lbw, lbwe)


def test_bad_elemental_directives_are_refused():
    for text, words in (("IN99-OUT01:attn:1", "unknown block 'IN99'"), ("IN01:attn", "blocks:elements:ratio"),
                        ("IN01:attn:x", "not a number")):
        with pytest.raises(ValueError, match=words):
            parse_elements(text)


def test_blocks_of_webui_layer_names():
    assert block_of("diffusion_model_input_blocks_1_1_proj_in") == "IN01"
    assert block_of("diffusion_model_input_blocks_10_0_in_layers_2") == "IN10"
    assert block_of("diffusion_model_middle_block_1_proj_in") == "M00"
    assert block_of("1_model_transformer_resblocks_0_attn_q_proj") == "BASE"
    assert block_of("transformer_text_model_final_layer_norm") is None
    assert block_of("diffusion_model_time_embed_0") is None
    assert BlockWeights("OUTS").multiplier("unet", "time_embed_0") == 1
    assert BlockWeights("OUTS").multiplier("te", "text_model_final_layer_norm") == 1
    assert BlockWeights("FLUXALL").values == dict.fromkeys(BLOCKS26, 1.0)


def test_combined_presets_drop_the_second_where_both_are_set():
    assert combined("1,1,0,0.5", "1,0,1,0.25") == "1,1,1,0.5"
