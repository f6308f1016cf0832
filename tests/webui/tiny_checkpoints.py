"""Writes tiny random-weight checkpoints the real WebUI loads: ``tiny-sdxl.safetensors`` or
``tiny-sd2v.safetensors`` and, beside each, a ``.yaml`` of the same name (the WebUI takes it over its own
config); SDXL also gets ``clip-l/`` (a 64-wide CLIP-L config with the real tokenizer files, named by path).

Run with the test bed's Python: ``python tiny_checkpoints.py sdxl|sd2v OUT_DIR BED_WEBUI_DIR HF_CLIP_SNAPSHOT``.
The real classes (sgm's for SDXL, ldm's for SD2) with the real layouts and key names, widths shrunk:
- SDXL: UNet 32 channels (attention on levels 2 and 3, one transformer block each), CLIP-L 12 layers of
  width 64, the second text encoder open_clip's ViT-S-32-alt text tower (the smallest one sgm's
  FrozenOpenCLIPEmbedder2 can build by name), VAE 32 channels;
- SD2 768-v (v-prediction): ldm's v2-inference-v layout with a 32-channel UNet, the same open_clip text
  tower (ldm's FrozenOpenCLIPEmbedder, nn.MultiheadAttention), VAE 32 channels.
Every weight is random and non-zero, so any LoRA changes the image.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

CLIP_HIDDEN, OPEN_CLIP_WIDTH = 64, 256
YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {adm}
        num_classes: sequential
        use_checkpoint: False
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 32
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 1, 1]
        context_dim: {context}
        spatial_transformer_attn_type: softmax-xformers
        legacy: False
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              version: {clip}
              layer: hidden
              layer_idx: 11
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-S-32-alt
              version: none
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

YAML_SD2V = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: False
        use_fp16: False
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4, 4]
        num_head_channels: 32
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: {context}
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        arch: ViT-S-32-alt
        version: none
        freeze: True
        layer: "penultimate"
"""


def write_clip_dir(out: pathlib.Path, hf_snapshot: pathlib.Path) -> pathlib.Path:
    clip = out / "clip-l"
    clip.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(hf_snapshot / name, clip / name)
    config = json.loads((hf_snapshot / "config.json").read_text())
    text = dict(config.get("text_config", {}), hidden_size=CLIP_HIDDEN, intermediate_size=4 * CLIP_HIDDEN,
                num_attention_heads=2, num_hidden_layers=12, projection_dim=CLIP_HIDDEN, vocab_size=49408,
                max_position_embeddings=77, hidden_act="quick_gelu", model_type="clip_text_model")
    text.pop("text_config_dict", None)
    (clip / "config.json").write_text(json.dumps(dict(text, architectures=["CLIPTextModel"])))
    return clip


def main(kind: str, out: pathlib.Path, webui: pathlib.Path, hf_snapshot: pathlib.Path) -> None:
    repo = "generative-models" if kind == "sdxl" else "stable-diffusion-stability-ai"
    sys.path.insert(0, str(webui / "repositories" / repo))
    import open_clip
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind == "sdxl":
        from sgm.util import instantiate_from_config
    else:
        from ldm.util import instantiate_from_config
    out.mkdir(parents=True, exist_ok=True)
    if kind == "sdxl":
        clip = write_clip_dir(out, hf_snapshot)
        yaml = YAML.format(adm=OPEN_CLIP_WIDTH + 6 * 256, context=CLIP_HIDDEN + OPEN_CLIP_WIDTH, clip=clip)
    else:
        yaml = YAML_SD2V.format(context=OPEN_CLIP_WIDTH)
    name = f"tiny-{kind}"
    (out / f"{name}.yaml").write_text(yaml)
    # sgm's FrozenCLIPEmbedder calls from_pretrained(version): build from the local config, never from a hub
    CLIPTextModel.from_pretrained = classmethod(
        lambda cls, path, **kw: cls(CLIPTextConfig.from_json_file(str(pathlib.Path(path) / "config.json"))))
    create = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = lambda *a, pretrained=None, **kw: create(*a, pretrained=None, **kw)
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.create(yaml).model)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, t in model.state_dict().items():
        if not key.startswith(("model.", "conditioner.", "cond_stage_model.", "first_stage_model.")) or "position_ids" in key:
            continue
        if t.is_floating_point() and not key.endswith(("alphas_cumprod", "sigmas")):
            fan_in = t[0].numel() if t.dim() > 1 else 1
            std = (1.0 / fan_in) ** 0.5 if t.dim() > 1 else 0.02
            t = torch.randn(t.shape, generator=gen) * std + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
        state[key] = (t.half() if t.is_floating_point() else t).contiguous()
    save_file(state, str(out / f"{name}.safetensors"))
    print(out / f"{name}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4]))
