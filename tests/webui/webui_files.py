"""Network files for the WebUI tests, shaped for the bed's SD1.5 checkpoint (built on the meta device)."""
from __future__ import annotations

import pathlib

import lorafiles
import models


def write_all(folder: pathlib.Path) -> None:
    sd15 = models.full_model("sd1", device="meta")
    lorafiles.save(folder / "kohya_a.safetensors", lorafiles.attention_lora(sd15, seed=1),
                   {"ss_network_module": "networks.lora", "ss_output_name": "kohya_a_alias"})
    lorafiles.save(folder / "kohya_b.safetensors", lorafiles.attention_lora(sd15, seed=2, diffusers_names=False),
                   {"ss_network_module": "networks.lora"})
    (folder / "sub").mkdir()
    lorafiles.save(folder / "sub" / "nested.safetensors", lorafiles.attention_lora(sd15, seed=3), {})
    b = lorafiles.attention_lora(sd15, seed=4, diffusers_names=False)
    lorafiles.save(folder / "peft_style.safetensors", lorafiles.as_peft(b, sd15), {})
    lorafiles.save(folder / "lyco_loha.safetensors", lorafiles.as_loha(b, seed=5),
                   {"ss_network_module": "lycoris.kohya"})
    xl = models.sdxl_skeleton(seed=0)
    lorafiles.save(folder / "xl_only.safetensors", lorafiles.random_kohya_lora(xl, rank=2, sdxl=True), {})
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
