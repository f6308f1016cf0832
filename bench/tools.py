"""Tools: resizing a full-size SD1.5 network (264 attention and text-encoder modules, rank 32 → 8) with the
tools' seeded randomized SVD against a full SVD of every delta (the reference), in the same process; prints
both times, their ratio and how far apart the two results are (target: faster, the same kept fractions and
modules within 1e-3 of each change's scale)."""
from __future__ import annotations

import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import lorafiles  # noqa: E402
import models  # noqa: E402
from lib_lora import load  # noqa: E402
from lib_lora.model_index import checkpoint_name  # noqa: E402
from lib_lora.tools import RankRule, as_modules, resize  # noqa: E402
from lib_lora.tools import lowrank  # noqa: E402


def main() -> int:
    meta = models.full_model("sd1", device="meta")
    # LoRA deltas do not depend on the base weights, only on their shapes: a zero checkpoint is enough
    tensors = {checkpoint_name(k): torch.zeros(v.shape, dtype=torch.float16) for k, v in meta.state_dict().items()}
    tree = as_modules(tensors)
    with tempfile.TemporaryDirectory() as folder:
        net = load(lorafiles.save(pathlib.Path(folder) / "r32.safetensors",
                                  lorafiles.attention_lora(meta, rank=32, seed=0), {}))
    rule = RankRule(rank=8)
    runs = {}
    for label, oversample in (("ours (randomized range finder)", lowrank.OVERSAMPLE), ("reference (full SVD)", 10 ** 6)):
        lowrank.OVERSAMPLE = oversample
        t0 = time.perf_counter()
        result = resize(net, tree, rule, precision="fp32")
        runs[label] = (time.perf_counter() - t0, result)
        print(f"{label}: {runs[label][0]:.1f} s, {result.summary()}")
    (t_ours, ours), (t_ref, ref) = runs.values()
    worst = 0.0
    for key in ref.ranks:
        a = ours.tensors[key + ".lora_up.weight"].flatten(1) @ ours.tensors[key + ".lora_down.weight"].flatten(1)
        b = ref.tensors[key + ".lora_up.weight"].flatten(1) @ ref.tensors[key + ".lora_down.weight"].flatten(1)
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    print(f"| metric | ours | reference | ratio |\n|---|---|---|---|\n"
          f"| resize 264 modules, rank 32 → 8 | {t_ours:.1f} s | {t_ref:.1f} s | {t_ref / t_ours:.1f}× faster |\n"
          f"| largest difference of a module's ΔW, relative to its largest entry | {worst:.1e} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
