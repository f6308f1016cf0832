"""Per-layer multipliers from block weights, as sd-webui-lora-block-weight (LBW) computes them.

A vector has 17 (SD1/SD2 LoRA), 26 (SD1/SD2 full), 12 (SDXL LoRA) or 20 (SDXL full) entries; BASE is
the text encoder(s), INnn/M00/OUTnn the UNet's input, middle and output blocks. Blocks a short vector
leaves out get 0. LBW also takes Flux's 61 entries; on SD models it reads their first 26 as the 26-block
vector, and so does this module.

Which block a layer is in follows LBW's rule on the WebUI's layer names (``network_layer_name``): the last of
its name fragments found in the name wins; a layer no fragment names (time embedding, final norm/conv,
token/position embeddings, a text encoder's final norm) keeps 1. Elemental directives (``lbwe=``) then set
the multiplier of the layers they select by block and name fragment, later directives winning.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

BLOCKS26 = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]
BLOCKS17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(3, 12)]
BLOCKS12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(6)]
BLOCKS20 = ["BASE"] + [f"IN{i:02}" for i in range(9)] + ["M00"] + [f"OUT{i:02}" for i in range(9)]
LAYOUTS = {17: BLOCKS17, 26: BLOCKS26, 12: BLOCKS12, 20: BLOCKS20}
FLUX_LENGTH = 61
LENGTHS = (12, 17, 20, 26, FLUX_LENGTH)
MAX_VALUE = 1e4

# LBW's default presets (its DEF_WEIGHT_PRESET, the lbwpresets.txt it writes), then this extension's SDXL ones.
PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    "FLUXALL": ",".join(["1"] * FLUX_LENGTH),
    "XLNONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "XLALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "XLIN": "1,1,1,1,1,0,0,0,0,0,0,0",
    "XLMID": "1,0,0,0,0,1,0,0,0,0,0,0",
    "XLOUT": "1,0,0,0,0,0,1,1,1,1,1,1",
}

_FRAGMENTS = ([("encoder", "BASE")]
              + [(f"diffusion_model_input_blocks_{i}_", f"IN{i:02}") for i in range(12)]
              + [("diffusion_model_middle_block_", "M00")]
              + [(f"diffusion_model_output_blocks_{i}_", f"OUT{i:02}") for i in range(12)]
              + [("embedders", "BASE"), ("transformer_resblocks", "BASE")])
# The WebUI names text-encoder layers after the wrapped encoder (extensions-builtin/Lora/networks.py).
_TE_PREFIX = {("te", "sd1"): "transformer_", ("te", "sd2"): "model_", ("te", "sdxl"): "0_transformer_",
              ("te2", "sdxl"): "1_model_"}
_RE_INHERITED = re.compile(r"X([+-])?([\d.]+)?")


class Random(Protocol):
    def random(self) -> float: ...

    def uniform(self, a: float, b: float) -> float: ...


def layer_name(part: str, path: str, sub: str | None = None, family: str | None = None) -> str:
    """The WebUI's name of a layer: ``diffusion_model_…`` in the UNet; ``transformer_…`` (SD1), ``model_…`` (SD2),
    ``0_transformer_…``/``1_model_…`` (SDXL) in a text encoder; a fused attention's q/k/v end in ``_q_proj``…"""
    if part == "unet":
        return "diffusion_model_" + path
    name = _TE_PREFIX.get((part, family), "") + path
    return f"{name}_{sub}_proj" if sub else name


def block_of(name: str) -> str | None:
    """The block of a WebUI layer name, or None for a layer outside every block."""
    block = None
    for fragment, b in _FRAGMENTS:
        if fragment in name:
            block = b
    return block


def block_range(spec: str, blocks: Sequence[str] = BLOCKS26) -> list[str]:
    """Space-separated block ids with ``A-B`` ranges (either order) expanded, as LBW writes them."""
    out = []
    for word in spec.split(" "):
        if "-" in word:
            a, b = word.split("-")[:2]
            for end in (a, b):
                if end not in blocks:
                    raise ValueError(f"unknown block {end!r} in {spec!r} (blocks: {', '.join(blocks)})")
            i, j = sorted((blocks.index(a), blocks.index(b)))
            out.extend(blocks[i:j + 1])
        else:
            out.append(word)
    return out


@dataclass(frozen=True)
class Element:
    """One elemental directive ``blocks:fragments:ratio``; a leading ``NOT`` inverts either selection."""

    blocks: tuple[str, ...]
    not_blocks: bool
    fragments: tuple[str, ...]
    not_fragments: bool
    ratio: float

    def selects(self, key: str) -> bool:
        """``key`` is a layer name followed by its block id; every selector is a substring test, as in LBW."""
        if any(b in key for b in self.blocks) == self.not_blocks:
            return False
        return any(f in key for f in self.fragments) != self.not_fragments


def parse_elements(text: str) -> tuple[Element, ...]:
    """Directives separated by commas or lines; empty ones are skipped."""
    out = []
    for d in text.replace("\r", "").replace("\n", ",").split(","):
        if not d.strip():
            continue
        if d.count(":") != 2:
            raise ValueError(f"an elemental directive is blocks:elements:ratio, not {d.strip()!r}")
        blocks_text, fragments_text, ratio_text = d.split(":")
        blocks, fragments = block_range(blocks_text), fragments_text.split(" ")
        not_blocks, not_fragments = blocks[0] == "NOT", fragments[0] == "NOT"
        ratio = _finite(ratio_text.strip(), d.strip())
        out.append(Element(tuple(blocks[not_blocks:]), not_blocks, tuple(fragments[not_fragments:]), not_fragments, ratio))
    return tuple(out)


def parse_vector(text: str, x: float | None = None, rng: Random | None = None) -> list[float]:
    """An LBW vector's entries: numbers, ``R`` (random 0…1), ``U`` (random -0.5…1.5, as LBW's code draws it,
    3 decimals) and ``X``/``X+d``/``X-d`` (the token's ``x`` value, 1 when it has none, plus or minus d)."""
    entries = [e.strip() for e in text.split(",")]
    if len(entries) not in LENGTHS:
        raise ValueError(f"a block-weight vector has 12, 17, 20 or 26 entries, not {len(entries)}: {text!r}")
    out = []
    for e in entries:
        if e in ("R", "U"):
            if rng is None:
                raise ValueError(f"{text!r} has random entries (R/U) and no random source was given")
            out.append(round(rng.random(), 3) if e == "R" else round(rng.uniform(-0.5, 1.5), 3))
        elif e.startswith("X"):
            m = _RE_INHERITED.match(e)
            base = 1.0 if x is None else x
            if m[1] and not m[2]:
                raise ValueError(f"{e!r} needs a number after {m[1]!r}")
            out.append(base if not m[1] else base + _finite(m[2], e) * (1 if m[1] == "+" else -1))
        else:
            out.append(_finite(e, text))
    return out


def _finite(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (in {where!r})") from None
    return _checked(v)


def _checked(v: float) -> float:
    if not math.isfinite(v) or abs(v) > MAX_VALUE:
        raise ValueError(f"block weights must be finite numbers within ±{MAX_VALUE:g}, not {v!r}")
    return v


class BlockWeights:
    """Block weights (a vector, or a default preset's name) and elemental directives: the multiplier of any layer.

    ``family`` names the WebUI layers that elemental fragments are matched against (``layer_name``)."""

    def __init__(self, spec: str | Sequence[float], elements: str | Sequence[Element] = (),
                 family: str | None = None):
        if isinstance(spec, str):
            spec = spec.strip()
            text = PRESETS.get(spec) or PRESETS.get(spec.upper()) or spec
            if "," not in text:
                raise ValueError(f"not a block-weight vector or preset: {spec!r} (presets: {', '.join(PRESETS)})")
            values = parse_vector(text)
        else:
            values = [_checked(float(v)) for v in spec]
            if len(values) not in LENGTHS:
                raise ValueError(f"a block-weight vector has 12, 17, 20 or 26 entries, not {len(values)}")
        layout = BLOCKS26 if len(values) == FLUX_LENGTH else LAYOUTS[len(values)]
        self.values = dict.fromkeys(BLOCKS26, 0.0)
        self.values.update(zip(layout, values))
        self.elements = parse_elements(elements) if isinstance(elements, str) else tuple(elements)
        self.family = family
        self.spec = ",".join(f"{v:g}" for v in values)

    def multiplier(self, part: str, path: str, sub: str | None = None) -> float:
        name = layer_name(part, path, sub, self.family)
        block = block_of(name)
        m = 1.0 if block is None else self.values[block]
        key = name + (block or "")
        for e in self.elements:
            if e.selects(key):
                m = e.ratio
        return m

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockWeights) and (self.values, self.elements, self.family) == \
            (other.values, other.elements, other.family)

    def __hash__(self) -> int:
        return hash((tuple(self.values.values()), self.elements, self.family))
