"""sd-webui-lora-block-weight's preset files and the block-weight vectors of its XYZ plot.

``lbwpresets.txt`` holds one ``NAME:v1,v2,…`` per line; LBW skips a line without ``:``, a line with a ``#``
anywhere, and a line whose vector length it does not know. ``elempresets.txt`` holds sections separated by
an empty line, each ``NAME:directive``, more directives following on new lines or after commas.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .blocks import LAYOUTS, LENGTHS, PRESETS, BlockWeights, Random, parse_elements, parse_vector

DEFAULT_ELEMENTS = {"ATTNDEEPON": "IN05-OUT05:attn:1", "ATTNDEEPOFF": "IN05-OUT05:attn:0",
                    "PROJDEEPOFF": "IN05-OUT05:proj:0", "XYZ": "::1"}
XYZ, ZYX = "XYZ", "ZYX"
XYZ_BASE = ",".join(["1"] * 17)


def parse_weight_presets(text: str) -> dict[str, str]:
    """``NAME:vector`` lines, skipped as LBW skips them."""
    out = {}
    for line in text.splitlines():
        if ":" not in line or "#" in line or line.count(",") + 1 not in LENGTHS:
            continue
        name, vector = line.split(":", 1)
        out[name.strip()] = vector
    return out


def parse_element_presets(text: str) -> dict[str, str]:
    """``NAME:directives`` sections separated by an empty line."""
    out = {}
    for section in text.replace("\r\n", "\n").split("\n\n"):
        if ":" in section:
            name, directives = section.split(":", 1)
            out[name.strip()] = directives
    return out


@dataclass
class BlockPresets:
    """Weight presets (name → vector text) and elemental presets (name → directives) in force."""

    weights: dict[str, str] = field(default_factory=lambda: dict(PRESETS))
    elements: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ELEMENTS))

    def updated(self, weights_text: str | None = None, elements_text: str | None = None) -> "BlockPresets":
        """A copy with the presets of these file texts added, replacing those of the same name."""
        return BlockPresets({**self.weights, **parse_weight_presets(weights_text or "")},
                            {**self.elements, **parse_element_presets(elements_text or "")})

    def weight_text(self, name: str) -> str | None:
        """A preset's vector text: the exact name first, then the one preset equal to it ignoring case."""
        if name in self.weights:
            return self.weights[name]
        folded = [v for k, v in self.weights.items() if k.casefold() == name.casefold()]
        return folded[0] if len(folded) == 1 else None

    def block_weights(self, lbw: str | None, lbwe: str | None, x: float | None = None, family: str | None = None,
                      rng: Random | None = None) -> BlockWeights | None:
        """What LBW applies for a token's ``lbw=`` (a preset or a vector) and ``lbwe=`` (an elemental preset):
        None when it has neither; all blocks at 1 when it has only ``lbwe=``."""
        if lbw is None and lbwe is None:
            return None
        values = [1.0] * 26
        if lbw is not None:
            text = self.weight_text(lbw)
            if text is None and "," not in lbw:
                raise ValueError(f"unknown block-weight preset {lbw!r} (presets: {', '.join(self.weights)})")
            values = parse_vector(lbw if text is None else text, x, rng)
        elements = ""
        if lbwe is not None:
            if lbwe not in self.elements:
                raise ValueError(f"unknown elemental preset {lbwe!r} (presets: {', '.join(self.elements)})")
            elements = self.elements[lbwe]
        return BlockWeights(values, parse_elements(elements), family)


def xyz_cell(presets: BlockPresets, value: str | None = None, blocks: str | None = None,
             originals: tuple[str, ...] = ()) -> str:
    """The vector ``XYZ`` stands for in one cell of LBW's XYZ plot: the base (the ``originals`` preset, the sum of
    two as LBW's XY plot of two "Original Weights" axes makes it, else the ``XYZ`` preset, else 17 ones) with
    ``blocks`` set to ``value`` when the plot has both."""
    def preset(name: str) -> str:
        text = presets.weight_text(name)
        if text is None:
            raise ValueError(f"unknown block-weight preset {name!r} (presets: {', '.join(presets.weights)})")
        return text

    if len(originals) > 2:
        raise ValueError("an XYZ plot takes at most two axes of original weights")
    if len(originals) == 2:
        return combined(preset(originals[0]), preset(originals[1]))
    base = preset(originals[0]) if originals else presets.weights.get(XYZ, XYZ_BASE)
    return xyz_vector(base, blocks, value)


def xyz_vector(base: str, blocks: str | None = None, value: str | None = None) -> str:
    """LBW's XYZ plot: ``base`` with the blocks named in ``blocks`` (ids and ``A-B`` ranges of the base's own
    layout, separated by spaces; a leading ``NOT`` selects all others) set to ``value``."""
    weights = [w.strip() for w in base.split(",")]
    if len(weights) not in LAYOUTS:
        raise ValueError(f"an XYZ base vector has 12, 17, 20 or 26 entries, not {len(weights)}")
    if blocks is None or value is None:
        return ",".join(weights)
    layout = LAYOUTS[len(weights)]
    ids = [i for i in blocks.strip().split(" ") if i]
    invert = bool(ids) and ids[0] == "NOT"
    chosen = [invert] * len(weights)
    for word in ids[invert:]:
        ends = [e.strip() for e in word.split("-")] if "-" in word else [word, word]
        for end in ends[:2]:
            if end not in layout:
                raise ValueError(f"block {end!r} is not in the {len(layout)}-block layout ({', '.join(layout)})")
        i, j = sorted((layout.index(ends[0]), layout.index(ends[1])))
        chosen[i:j + 1] = [not invert] * (j + 1 - i)
    return ",".join(value if c else w for w, c in zip(weights, chosen))


def inverted(vector: str) -> str:
    """LBW's ``ZYX``: 1 - w for every number (random and ``X`` entries kept)."""
    return ",".join(w if w[:1] in ("R", "U", "X") else str(1 - float(w)) for w in (e.strip() for e in vector.split(",")))


def combined(x: str, y: str) -> str:
    """LBW's XY plot of two presets: their sum, with ``y``'s entries dropped where both are non-zero."""
    xs, ys = [float(v) for v in x.split(",")], [float(v) for v in y.split(",")]
    if len(xs) != len(ys):
        raise ValueError(f"presets of {len(xs)} and {len(ys)} entries cannot be combined")
    return ",".join(format(round(a + (0.0 if a and b else b), 3), ".3f").rstrip("0").rstrip(".") for a, b in zip(xs, ys))

