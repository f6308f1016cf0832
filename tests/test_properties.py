"""Property tests: no input makes the prompt parser or the key mapper raise anything unexpected."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from lib_lora.keymap import detect_family, split_key, target_for
from lib_lora.prompt import PromptError, parse_items, parse_prompt

token_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
items = st.lists(st.one_of(token_text, st.sampled_from(["1", "0.5", "-2", "nan", "inf", "1e400", "te=0.3", "unet=x",
                                                       "dyn=2", "dyn=0", "lbw=OUTS", "lbw=1,2", "start=0.2",
                                                       "stop=3", "../x", "/abs", "C:\\x", "a\x00b", ""])),
                 min_size=0, max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200), items)
def test_parse_prompt_never_raises(text, parts):
    prompt = text + "<lora:" + ":".join(parts) + ">" + text
    clean, requests, messages = parse_prompt(prompt)
    assert isinstance(clean, str)
    for r in requests:
        assert r.name and ".." not in r.name.replace("\\", "/").split("/")


@settings(max_examples=400, deadline=None)
@given(items)
def test_parse_items_raises_only_prompt_errors(parts):
    try:
        parse_items(parts)
    except PromptError:
        pass


key_text = st.one_of(
    st.text(max_size=80),
    st.builds(lambda p, body, param: p + body + param,
              st.sampled_from(["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "unet.", "text_encoder.",
                               "text_encoder_2.", "model.diffusion_model.", "cond_stage_model.model.", ""]),
              st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789.", max_size=60),
              st.sampled_from([".lora_up.weight", ".alpha", ".hada_w1_a", "", ".lora_A.weight", ".weight", ".processor.to_q_lora.up.weight"])),
)


@settings(max_examples=600, deadline=None)
@given(st.lists(key_text, max_size=8), st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=3))
def test_key_mapper_never_raises(keys, metadata):
    split = {}
    for k in keys:
        s = split_key(k)
        if s is not None:
            split[k] = s
            for fam in ("sd1", "sd2", "sdxl", None):
                target_for(s[0], s[1], fam)
    detect_family(split, dict.fromkeys(split, (2, 3)), metadata)
