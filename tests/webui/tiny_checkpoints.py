"""Writes tiny random-weight checkpoints the real WebUI loads: ``tiny-sdxl.safetensors``, ``tiny-sd2v.safetensors``
or ``tiny-sd1.safetensors`` (``tiny-sd3.safetensors`` needs none) and, beside each, a ``.yaml`` of the same name
(the WebUI takes it over its own config); SDXL and SD1 also get ``clip-l/`` (a 64-wide CLIP-L config with the real
tokenizer files, named by path).

Run with the test bed's Python: ``python tiny_checkpoints.py sdxl|sd2v|sd1|sd3 OUT_DIR BED_WEBUI_DIR HF_CLIP_SNAPSHOT``
or ``python tiny_checkpoints.py t5-tokenizer HUB_DIR``.
The real classes (sgm's for SDXL, ldm's for SD1 and SD2) with the real layouts and key names, widths shrunk:
- SDXL: UNet 32 channels (attention on levels 2 and 3, one transformer block each), CLIP-L 12 layers of
  width 64, the second text encoder open_clip's ViT-S-32-alt text tower (the smallest one sgm's
  FrozenOpenCLIPEmbedder2 can build by name), VAE 32 channels;
- SD2 768-v (v-prediction): ldm's v2-inference-v layout with a 32-channel UNet, the same open_clip text
  tower (ldm's FrozenOpenCLIPEmbedder, nn.MultiheadAttention), VAE 32 channels;
- SD1: ldm's v1-inference layout with a 32-channel UNet, the 64-wide CLIP-L (ldm's FrozenCLIPEmbedder), VAE 32
  channels;
- SD3: the WebUI's own ``modules/models/sd3`` classes (built with the WebUI's modules imported as it imports them):
  an MMDiT of depth 2 (the WebUI derives width 64·depth and the head count from the depth, so depth 2 is width
  128 with one ordinary and one last, context-pre-only joint block), and CLIP-L, CLIP-G and the VAE at their real
  sizes, which ``sd3_cond.py`` fixes (a checkpoint without them makes the WebUI download them). T5 stays off (the
  WebUI's default ``sd3_enable_t5``), so the checkpoint holds no T5 (9 GB at its fixed size); its tokenizer, which the
  WebUI loads anyway, is written into the bed's HF cache by ``t5-tokenizer HUB_DIR``.
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

# SD1: the same ldm layout without v-prediction, heads by count and conv proj_in/out, CLIP-L text encoder
YAML_SD1 = (YAML_SD2V.replace('    parameterization: "v"\n', "").replace("num_head_channels: 32", "num_heads: 8")
            .replace("        use_linear_in_transformer: True\n", "").split("    cond_stage_config:")[0]
            + "    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"
              "      params:\n        version: {clip}\n")


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
    elif kind == "sd1":
        yaml = YAML_SD1.format(context=CLIP_HIDDEN, clip=write_clip_dir(out, hf_snapshot))
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
    keep = ("model.", "conditioner.", "cond_stage_model.", "first_stage_model.")
    save_file(random_state({k: t for k, t in model.state_dict().items() if k.startswith(keep)}),
              str(out / f"{name}.safetensors"))
    print(out / f"{name}.safetensors")


def random_state(tensors: dict) -> dict:
    """Seeded random fp16 weights of these shapes (norm weights around 1); fixed buffers kept as they are."""
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, t in tensors.items():
        if "position_ids" in key:
            continue
        if t.is_floating_point() and not key.endswith(("alphas_cumprod", "sigmas")):
            fan_in = t[0].numel() if t.dim() > 1 else 1
            std = (1.0 / fan_in) ** 0.5 if t.dim() > 1 else 0.02
            t = torch.randn(t.shape, generator=gen) * std + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
        state[key] = (t.half() if t.is_floating_point() else t).contiguous()
    return state


SD3_DEPTH, SD3_POS_EMBED_MAX = 2, 16


def sd3(out: pathlib.Path, webui: pathlib.Path) -> None:
    """The checkpoint's tensors named and shaped as the WebUI's SD3Inferencer loads them (its classes built on the
    meta device: nothing of full size is allocated but the random weights written)."""
    import os

    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"
    sys.argv[1:] = []
    sys.path.insert(0, str(webui))
    os.chdir(webui)
    from modules import initialize
    initialize.imports()
    import torch
    from safetensors.torch import save_file
    from modules.models.sd3 import other_impls, sd3_cond, sd3_impls

    hidden = 64 * SD3_DEPTH
    shapes = {"x_embedder.proj.weight": (hidden, 16, 2, 2), "pos_embed": (1, SD3_POS_EMBED_MAX ** 2, hidden),
              "y_embedder.mlp.0.weight": (hidden, 768 + 1280), "context_embedder.weight": (hidden, 4096)}
    with torch.device("meta"), torch.no_grad():  # no_grad as SD3Cond builds them
        parts = {
            "model.": sd3_impls.BaseModel(shift=3, state_dict={k: torch.empty(s) for k, s in shapes.items()},
                                          prefix="", device="meta"),
            "first_stage_model.": sd3_impls.SDVAE(device="meta"),
            "text_encoders.clip_l.": other_impls.SDClipModel(
                layer="hidden", layer_idx=-2, device="meta", layer_norm_hidden_state=False,
                return_projected_pooled=False, textmodel_json_config=sd3_cond.CLIPL_CONFIG),
            "text_encoders.clip_g.": other_impls.SDXLClipG(sd3_cond.CLIPG_CONFIG, device="meta"),
        }
    tensors = {prefix + k: t for prefix, m in parts.items() for k, t in m.state_dict().items() if "model_sampling" not in k}
    out.mkdir(parents=True, exist_ok=True)
    save_file(random_state(tensors), str(out / "tiny-sd3.safetensors"))
    print(out / "tiny-sd3.safetensors")


def t5_tokenizer(hub: pathlib.Path) -> None:
    """``google/t5-v1_1-xxl``'s tokenizer in the HF cache layout: T5's special tokens (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, 100 ``<extra_id_N>``) over a small Unigram vocabulary of single characters, built here."""
    import hashlib
    import string
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", add_prefix_space=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", add_prefix_space=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    with tempfile.TemporaryDirectory() as tmp:
        T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                        extra_ids=100).save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(pathlib.Path(tmp).iterdir())}
    rev = hashlib.sha1(b"".join(files.values())).hexdigest()
    repo = hub / "models--google--t5-v1_1-xxl"
    (repo / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (repo / "snapshots" / rev / name).write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    print(repo)


if __name__ == "__main__":
    if sys.argv[1] == "t5-tokenizer":
        t5_tokenizer(pathlib.Path(sys.argv[2]))
    elif sys.argv[1] == "sd3":
        sd3(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))
    else:
        main(sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4]))
