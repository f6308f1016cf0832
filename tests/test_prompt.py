"""Every `<lora:…>` form the built-in accepts, plus ours; malformed tokens give messages, never exceptions."""
from __future__ import annotations

import pytest

from lib_lora.prompt import PromptError, Request, parse_items, parse_prompt, resolve_step, rewrite_tokens, \
    with_block_weights, with_weight, with_xyz_vectors


@pytest.mark.parametrize("token,want", [
    ("<lora:x>", Request("x", None, None)),
    ("<lora:x:0.7>", Request("x", 0.7, 0.7)),
    ("<lora:x:0.5:1.2>", Request("x", 0.5, 1.2)),
    ("<lora:x:0.5:1.2:8>", Request("x", 0.5, 1.2, 8)),
    ("<lora:x:te=0.3:unet=0.9>", Request("x", 0.3, 0.9)),
    ("<lora:x:0.8:unet=0.2>", Request("x", 0.8, 0.2)),
    ("<lora:x:1:dyn=4>", Request("x", 1.0, 1.0, 4)),
    ("<lora:x:1:lbw=OUTS>", Request("x", 1.0, 1.0, lbw="OUTS")),
    ("<lora:x:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>", Request("x", 1.0, 1.0, lbw="1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")),
    ("<lora:x:1:start=0.25:stop=10>", Request("x", 1.0, 1.0, start=0.25, stop=10.0)),
    ("<lyco:sub/dir/x:0.6>", Request("sub/dir/x", 0.6, 0.6)),
    ("<lora:x:0.7:OUTS>", Request("x", 0.7, 0.7, lbw="OUTS")),
    ("<lora:x:1:0,0,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0>", Request("x", 1.0, 1.0, lbw="0,0,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0")),
    ("<lora:x:0.5:ROUT:0.7>", Request("x", 0.5, 0.5, lbw="ROUT", x=0.7)),
    ("<lora:x:1:OUTS:ATTNDEEPON>", Request("x", 1.0, 1.0, lbw="OUTS", lbwe="ATTNDEEPON")),
    ("<lora:x:1:lbw=MIDD:lbwe=ATTNON:x=0.3>", Request("x", 1.0, 1.0, lbw="MIDD", lbwe="ATTNON", x=0.3)),
    ("<lora:x:lbw=ALL:step=5-10>", Request("x", lbw="ALL", start=5.0, stop=10.0)),
    ("<lora:x:lbw=ALL:step=5->", Request("x", lbw="ALL", start=5.0)),
])
def test_forms(token, want):
    clean, requests, messages = parse_prompt(f"a cat {token}, best")
    assert clean == "a cat , best" and messages == []
    got = requests[0]
    assert (got.name, got.te, got.unet, got.dyn, got.lbw, got.lbwe, got.x, got.start, got.stop) == \
        (want.name, want.te, want.unet, want.dyn, want.lbw, want.lbwe, want.x, want.start, want.stop)


@pytest.mark.parametrize("token,words", [
    ("<lora::1>", "needs a name"),
    ("<lora:x:abc>", "must be a number"),
    ("<lora:x:nan>", "finite"),
    ("<lora:x:inf>", "finite"),
    ("<lora:x:1e308>", "finite"),
    ("<lora:x:1:1:0>", "dyn"),
    ("<lora:x:1:1:2.5>", "dyn"),
    ("<lora:../x:1>", "not a name inside"),
    ("<lora:a/../../x:1>", "not a name inside"),
    ("<lora:/etc/passwd:1>", "not a name inside"),
    ("<lora:C:\\x>", "must be a number"),
    ("<lora:\\\\server\\x:1>", "not a name inside"),
    ("<lora:x:1:lbw=1,2>", "12, 17, 20 or 26"),
    ("<lora:x:1:foo=2>", "unknown option"),
    ("<lora:x:1:start=5:stop=2>", "after start"),
    ("<lora:x:1:2:3:4>", "too many"),
    ("<lora:x:1:OUTS:0.5:2>", "too many"),
    ("<lora:x:1:lbw=ALL:step=5>", "FIRST-LAST"),
    ("<lora:x:1:step=2-4:start=1>", "not both"),
    ("<lora:x:1:lbw=ALL:x=abc>", "must be a number"),
])
def test_malformed_tokens_give_messages(token, words):
    clean, requests, messages = parse_prompt(f"a {token} b")
    assert requests == [] and len(messages) == 1 and words in messages[0], messages
    assert token not in clean


def test_nul_byte_name_is_refused():
    with pytest.raises(PromptError):
        parse_items(["a\x00b", "1"])


@pytest.mark.parametrize("prompt,change,want", [
    ("a <lora:x:1> b", "weight", "a <lora:x:0.5> b"),
    ("<lora:x>, <lyco:y:0.8:0.3:4>", "weight", "<lora:x:0.5>, <lyco:y:0.5:0.5:4>"),
    ("<lora:x:1:OUTS:0.7>", "weight", "<lora:x:0.5:OUTS:0.7>"),
    ("<lora:x:te=0.2:unet=0.3:lbw=ALL>", "weight", "<lora:x:te=0.5:unet=0.5:lbw=ALL>"),
    ("<lora:x:unet=0.3>", "weight", "<lora:x:0.5:unet=0.5>"),
    ("<lora:x:1>", "blocks", "<lora:x:1:lbw=INS>"),
    ("<lora:x:1:OUTS:0.7>", "blocks", "<lora:x:1:INS:0.7>"),
    ("<lora:x:lbw=ALL:stop=3> <lora:y:1:1:2>", "blocks", "<lora:x:lbw=INS:stop=3> <lora:y:1:1:2:lbw=INS>"),
])
def test_tokens_rewritten_for_xyz_plots(prompt, change, want):
    edit = (lambda items: with_weight(items, "0.5")) if change == "weight" else (lambda items: with_block_weights(items, "INS"))
    assert rewrite_tokens(prompt, edit) == (want, want.count("<"))


def test_xyz_tokens_get_the_cells_vector_and_its_inverse():
    text, found = with_xyz_vectors("<lora:a:1:lbw=XYZ> <lora:b:0.5:ZYX> <lora:c:1:lbw=OUTS> <lora::bad>", "1,0,0.25")
    assert found == 2
    assert text == "<lora:a:1:lbw=1,0,0.25> <lora:b:0.5:0.0,1.0,0.75> <lora:c:1:lbw=OUTS> <lora::bad>"


def test_steps_resolve_fractions_and_numbers():
    assert resolve_step(0.25, 20) == 5 and resolve_step(7, 20) == 7 and resolve_step(None, 20) is None
