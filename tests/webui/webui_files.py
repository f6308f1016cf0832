"""Network files for the WebUI tests, shaped for the bed's SD1.5 checkpoint (built on the meta device)."""
from __future__ import annotations

import json
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
    write_card_files(folder, sd15)


def write_card_files(folder: pathlib.Path, sd15) -> None:
    """For the card page: kohya training metadata, a civitai.info, a preview, sidecars (one with a key the
    WebUI does not know, one corrupt) and a rank-32 network."""
    from PIL import Image
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_network_alpha": "16",
            "ss_base_model_version": "sd_v1", "ss_num_epochs": "10", "ss_max_train_steps": "1500",
            "ss_resolution": "(512, 512)",
            "ss_dataset_dirs": json.dumps({"10_ink": {"n_repeats": 10, "img_count": 15}}),
            "ss_tag_frequency": json.dumps({"10_ink": {"ink": 15, "monochrome": 9, "sketch": 4}})}
    lorafiles.save(folder / "styled.safetensors", lorafiles.attention_lora(sd15, rank=32, seed=6), meta)
    (folder / "styled.civitai.info").write_text(json.dumps({
        "trainedWords": ["inkstyle"], "baseModel": "SD 1.5", "description": "<p>Ink wash painting style</p>",
        "images": [{"url": "https://example.invalid/1.png"}]}), encoding="utf8")
    (folder / "styled.json").write_text(json.dumps({"custom key": "kept"}), encoding="utf8")
    ramp = Image.linear_gradient("L").resize((192, 288))
    preview = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_180), Image.new("L", ramp.size, 150)))
    preview.save(folder / "styled.preview.png")
    lorafiles.save(folder / "corrupt_card.safetensors", lorafiles.attention_lora(sd15, seed=7), {})
    (folder / "corrupt_card.json").write_text('{"activation text": "cut off', encoding="utf8")
