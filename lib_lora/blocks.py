"""Per-block multipliers with the vectors and presets of sd-webui-lora-block-weight (LBW).

A vector has 17 (SD1/SD2 LoRA), 26 (SD1/SD2 full), 12 (SDXL LoRA) or 20 (SDXL full) entries; BASE is
the text encoder(s), INnn/M00/OUTnn the UNet's input, middle and output blocks. Blocks a short vector
leaves out get 0; UNet layers outside every block (time embedding, final norm/conv) keep 1, as in LBW.
"""
from __future__ import annotations

import re

BLOCKS26 = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]
BLOCKS17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(3, 12)]
BLOCKS12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(6)]
BLOCKS20 = ["BASE"] + [f"IN{i:02}" for i in range(9)] + ["M00"] + [f"OUT{i:02}" for i in range(9)]
LAYOUTS = {17: BLOCKS17, 26: BLOCKS26, 12: BLOCKS12, 20: BLOCKS20}

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
    "XLNONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "XLALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "XLIN": "1,1,1,1,1,0,0,0,0,0,0,0",
    "XLMID": "1,0,0,0,0,1,0,0,0,0,0,0",
    "XLOUT": "1,0,0,0,0,0,1,1,1,1,1,1",
}

_RE_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)_(\d+)_")


class BlockWeights:
    """A parsed block-weight vector: multiplier for any target."""

    def __init__(self, spec: str | list[float] | tuple[float, ...]):
        if isinstance(spec, str):
            spec = spec.strip()
            spec = PRESETS.get(spec.upper(), spec)
            try:
                values = [float(v) for v in spec.replace(" ", "").split(",")]
            except ValueError:
                raise ValueError(f"not a block-weight vector or preset: {spec!r} (presets: {', '.join(PRESETS)})") from None
        else:
            values = [float(v) for v in spec]
        if len(values) not in LAYOUTS:
            raise ValueError(f"a block-weight vector has 12, 17, 20 or 26 entries, not {len(values)}")
        if any(v != v or abs(v) > 1e4 for v in values):
            raise ValueError("block weights must be finite numbers")
        layout = LAYOUTS[len(values)]
        self.values = dict.fromkeys(BLOCKS26, 0.0)
        self.values.update(zip(layout, values))
        self.spec = ",".join(f"{v:g}" for v in values)

    def block_of(self, part: str, path: str) -> str | None:
        if part != "unet":
            return "BASE"
        m = _RE_BLOCK.match(path)
        if not m:
            return None
        if m[1] == "middle_block":
            return "M00"
        return ("IN" if m[1] == "input_blocks" else "OUT") + f"{int(m[2]):02}"

    def multiplier(self, part: str, path: str) -> float:
        block = self.block_of(part, path)
        return 1.0 if block is None else self.values.get(block, 0.0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockWeights) and self.values == other.values

    def __hash__(self) -> int:
        return hash(tuple(self.values.values()))
