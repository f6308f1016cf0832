#!/usr/bin/env python
"""Training benchmark: ``lib_lora.train.Trainer`` against a plain diffusers + peft LoRA loop, same run.

The fixed config: SD1 UNet topology (ldm ``UNetModel``, real block counts, attention at 4/2/1, 8 heads,
context 768) at reduced width (``--channels``, default 64), 256×256 images → 32×32 latents cached before
training, batch 2, LoRA rank 16 / alpha 16 on kohya's SD1 set (every Linear / 1×1 conv of the 16
transformer blocks: proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2;
192 modules), text encoder frozen, AdamW lr 1e-4, constant schedule, grad-norm clip 1.0, DDPM
scaled_linear noise (1000 steps, ε-prediction, MSE), fp32 on CPU, same seed.

* ours: ``Trainer`` on a WebUI-style container holding the ldm UNet, with the WebUI's "sdp" cross-attention
  optimisation applied (``scaled_dot_product_attention_forward`` of ``sd_hijack_optimizations``; the
  WebUI always replaces ldm's own attention), so the model runs the same maths as diffusers' default
  ``AttnProcessor2_0``; latents are cached by the Trainer's own cache through a fixed random "VAE"
  (8×8 average pool + random 1×1 conv) before the first step.
* ours, stock ldm attention (info): the same, without the hijack (ldm's einsum + softmax attention).
* diffusers + peft: ``UNet2DConditionModel`` built from the config diffusers derives from the ldm config
  (``create_unet_diffusers_config_from_ldm``), holding the SAME weights (``convert_ldm_unet_checkpoint``),
  ``add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=[...]))`` as diffusers'
  ``train_text_to_image_lora.py`` does, latents from the same images through the same "VAE" computed
  before the loop, and a plain loop: noise, timesteps, ``DDPMScheduler.add_noise``, UNet, MSE,
  backward, clip, AdamW step, scheduler step, zero_grad.

Both get the same text conditioning: captions are tokenised by a word hash and the frozen "text encoder"
is a fixed token → 768-d lookup table (a real CLIP-L-shaped encoder costs more than this UNet on CPU and
is the same work in both loops, so it would only dilute the comparison).

Each loop runs in its own subprocess (``--child``), so peak memory is clean: the child resets its peak RSS
(``/proc/self/clear_refs``) after imports and model loading, just before the training job (network
creation, latent caching, optimizer, steps), and reads ``VmHWM`` right after the last timed step. Speed
is the timed steps after the warm-up steps (time between the Trainer's progress events; per step in
the reference). The loops alternate over rounds (the machine may be shared) and the table gives medians
of per-round values and ratios.

With ``--kohya DIR --kohya-python PY`` (an sd-scripts checkout and a Python that has its requirements; the
user brings both, nothing here installs kohya) a second comparison runs on a full-size SD1.5 checkpoint
(``--checkpoint``, default the test bed's ``random-sd15.safetensors``): kohya's own ``train_network.py`` and this
trainer built from the same file by ``--pretrained_model_name_or_path`` alone (``lib_lora.train.loader`` with the
WebUI's code, ``--webui``), run with ``--ours-python`` (default: this Python; it needs the WebUI's packages).
Same images (``--kohya-size``, default 128×128 → 16×16 cached latents: a full-size UNet step on a shared CPU), batch 2, LoRA rank 16 / alpha 16 on the UNet only (kohya's
networks.lora: the 192 transformer-block modules), AdamW lr 1e-4, constant, clip 1.0, fp32, ``--sdpa`` on both, same
seed; runs alternate (kohya, ours, kohya, ours), each in its own process, peak RSS reset after the model is loaded.

Progress goes to stderr; the markdown tables (for the README) go to stdout. Nothing is downloaded.
Run:  python bench/train.py [--rounds 2] [--steps 20] [--warmup 3] [--channels 64] [--threads 2]
      [--kohya DIR --kohya-python PY [--webui DIR] [--ours-python PY] [--kohya-only]]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import cpu_model, loadavg, proc_status, reset_peak  # noqa: E402
import torch  # noqa: E402

T0 = time.perf_counter()
EPOCH = float(os.environ.get("BENCH_TRAIN_EPOCH", time.time()))  # children log on the parent's clock
VARIANTS = {
    "ours": "ours: lib_lora Trainer, ldm UNet (WebUI sdp attention)",
    "ref": "diffusers + peft loop",
    "ours-ldm-attn": "ours: lib_lora Trainer, ldm UNet, stock ldm attention (einsum + softmax)",
    "ckpt-ours": "ours: python -m lib_lora.train's model from the SD1.5 checkpoint, --sdpa",
    "ckpt-kohya": "kohya sd-scripts train_network.py on the SD1.5 checkpoint, --sdpa",
}
BED = Path(os.environ.get("WEBUI_TESTBED", Path.home() / ".cache" / "sd-webui-testbed"))
TARGETS = ["proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
CONTEXT_LENGTH, VOCAB, CONTEXT_DIM = 77, 1000, 768


def log(msg: str) -> None:
    print(f"[{time.time() - EPOCH:7.1f}s] {msg}", file=sys.stderr, flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


# ---- what both loops share: config, data, tokenizer, "text encoder", "VAE" ---------------------------
def unet_config(channels: int) -> dict:
    """ldm ``UNetModel`` kwargs: SD1 (v1-inference.yaml) with the width reduced."""
    return dict(image_size=32, in_channels=4, out_channels=4, model_channels=channels, num_res_blocks=2,
                attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], use_spatial_transformer=True,
                transformer_depth=1, num_heads=8, context_dim=CONTEXT_DIM, use_linear_in_transformer=False,
                use_checkpoint=False, legacy=False)


def tokenize(captions: list[str]) -> torch.Tensor:
    out = torch.ones(len(captions), CONTEXT_LENGTH, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [0] + [2 + zlib.crc32(w.encode()) % (VOCAB - 2) for w in caption.replace(",", " ").split()]
        out[i, :min(len(ids), CONTEXT_LENGTH)] = torch.tensor(ids[:CONTEXT_LENGTH])
    return out


class Shared:
    """The fixed random tensors both loops use: the token → context table and the "VAE" weight."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed + 101)
        self.table = torch.randn(VOCAB, CONTEXT_DIM, generator=g)
        self.vae_weight = torch.randn(4, 3, 1, 1, generator=g)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.nn.functional.conv2d(pooled, self.vae_weight) * 0.18215


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (250, 250 - 7 * i, 240))
        d = ImageDraw.Draw(im)
        d.ellipse([16 + 3 * i, 20, size - 16, size - 24 - 2 * i], fill=(40 * i % 255, 200, 255 - 13 * i))
        d.rectangle([8, size // 2, size // 3 + 4 * i, size - 8], fill=(200 - 9 * i, 60, 30 + 11 * i))
        im.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"cat, color{i}, round, shape{i % 3}")


def ldm_sdp_attention() -> None:
    """The WebUI's "sdp" cross-attention optimisation (``sd_hijack_optimizations.
    scaled_dot_product_attention_forward``, without mask / hypernetworks / upcast, which are unused here)."""
    from ldm.modules import attention

    def forward(self, x, context=None, mask=None, **kwargs):
        batch_size, _, inner_dim = x.shape
        h = self.heads
        q_in = self.to_q(x)
        context = x if context is None else context
        k_in, v_in = self.to_k(context), self.to_v(context)
        head_dim = inner_dim // h
        q = q_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
        k = k_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
        v = v_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
        del q_in, k_in, v_in
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, h * head_dim)
        out = self.to_out[0](out)
        return self.to_out[1](out)

    attention.CrossAttention.forward = forward


# ---- preparation (parent) ---------------------------------------------------------------------------
def diffusers_config(channels: int) -> dict:
    import warnings

    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {"unet_config": {"params": unet_config(channels)},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_unet_diffusers_config_from_ldm(original, {}, image_size=8 * 32)


def prepare(work: Path, setup: dict) -> dict:
    """Weights (ldm and diffusers-converted, the same numbers), images; checks both UNets agree."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from models import randomize_
    from safetensors.torch import save_file

    torch.set_num_threads(setup["threads"])
    unet = randomize_(UNetModel(**unet_config(setup["channels"])).float().eval(), setup["seed"])
    sd = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    save_file(sd, str(work / "unet_ldm.safetensors"))
    config = diffusers_config(setup["channels"])
    converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v.clone() for k, v in sd.items()}, config)
    dunet = UNet2DConditionModel(**config)
    dunet.load_state_dict(converted, strict=True)
    dunet.eval()
    save_file({k: v.contiguous() for k, v in dunet.state_dict().items()}, str(work / "unet_diffusers.safetensors"))
    (work / "diffusers_config.json").write_text(json.dumps(config))

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([37, 901])
    c = torch.randn(2, CONTEXT_LENGTH, CONTEXT_DIM, generator=g)
    with torch.no_grad():
        ref = dunet(x, t, encoder_hidden_states=c).sample
        stock = unet(x, t, context=c)
        ldm_sdp_attention()
        sdp = unet(x, t, context=c)
    info = dict(params=sum(p.numel() for p in unet.parameters()), attn_processor=type(
        dunet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor).__name__,
        diff_sdp=float((sdp - ref).abs().max()), diff_stock=float((stock - ref).abs().max()),
        scale=float(ref.abs().max()))
    if info["diff_sdp"] > 1e-4 * max(1.0, info["scale"]):
        raise RuntimeError(f"the ldm and diffusers UNets disagree: {info}")
    make_images(work / "img" / "1_cat", setup["images"], setup["size"])
    (work / "setup.json").write_text(json.dumps(setup))
    return info


# ---- the children -----------------------------------------------------------------------------------
def load_weights(module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)), strict=True, assign=True)


def child_ours(work: Path, setup: dict, variant: str, out: dict) -> None:
    import models as M
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from lib_lora.train import ModelBundle, TrainConfig, Trainer

    if variant == "ours":
        ldm_sdp_attention()
    shared = Shared(setup["seed"])
    with torch.device("meta"):
        unet = UNetModel(**unet_config(setup["channels"]))
    load_weights(unet, work / "unet_ldm.safetensors")
    # A WebUI-style container; the (tiny, untrained) CLIP is there because the Trainer and the key
    # naming want a text encoder; conditioning comes from the shared lookup table.
    te = M.tiny_clip_text(seed=setup["seed"] + 1)
    sd_model = M.StableDiffusionModel("sd1")
    sd_model.model = M.DiffusionWrapper(unet.float().eval())
    sd_model.cond_stage_model = M.EmbedderWithCustomWords(M.FrozenCLIPEmbedder(te))
    bundle = ModelBundle(sd_model, shared.vae_encode, tokenize, shared.encode_text, vae_id="bench-vae")
    total = setup["warmup"] + setup["steps"]
    cfg = TrainConfig(train_data_dir=str(work / "img"), resolution=str(setup["size"]), enable_bucket=False,
                      train_batch_size=setup["batch"], network_dim=setup["rank"], network_alpha=float(setup["rank"]),
                      network_train_unet_only=True, learning_rate=1e-4, optimizer_type="AdamW",
                      lr_scheduler="constant", max_grad_norm=1.0, max_train_steps=total, seed=setup["seed"],
                      cache_latents=True, mixed_precision="no", validate_every_n_epochs=None, save_state=False,
                      output_dir=str(work / f"out-{variant}-{os.getpid()}"), output_name="bench")
    trainer = Trainer(cfg, bundle, log_fn=lambda m: log(f"  [{variant}] {m}"))
    stamps: list[float] = []
    losses: list[float] = []

    def progress(p) -> None:
        if p.phase != "training":
            return
        stamps.append(time.perf_counter())
        losses.append(p.loss)
        if p.step == total:
            out["train_hwm"] = proc_status("VmHWM")
            out["modules"] = len(trainer.network.loras)
            out["trainable"] = sum(p.numel() for p in trainer.network.parameters() if p.requires_grad)
        if p.step % 5 == 0 or p.step == total:
            log(f"  [{variant}] step {p.step}/{total} loss {p.loss:.4f}")

    out["setup_hwm"] = proc_status("VmHWM")
    out["peak_reset"] = reset_peak()
    out["rss0"] = proc_status("VmRSS")
    out["start"] = time.perf_counter()
    trainer.run(progress)
    w = setup["warmup"]
    out["step_times"] = [b - a for a, b in zip(stamps[w - 1:], stamps[w:])]
    out["first_step_at"] = stamps[0] - out.pop("start")
    out["losses"] = losses[w:]


def child_ref(work: Path, setup: dict, out: dict) -> None:
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    shared = Shared(setup["seed"])
    config = json.loads((work / "diffusers_config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    load_weights(unet, work / "unet_diffusers.safetensors")
    unet.requires_grad_(False)
    total = setup["warmup"] + setup["steps"]

    out["setup_hwm"] = proc_status("VmHWM")
    out["peak_reset"] = reset_peak()
    out["rss0"] = proc_status("VmRSS")
    t_start = time.perf_counter()
    torch.manual_seed(setup["seed"])
    unet.add_adapter(LoraConfig(r=setup["rank"], lora_alpha=setup["rank"], init_lora_weights="gaussian",
                                target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    from peft.tuners.tuners_utils import BaseTunerLayer

    out["modules"] = sum(isinstance(m, BaseTunerLayer) for m in unet.modules())
    out["trainable"] = sum(p.numel() for p in params)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)

    # cached latents: every image through the "VAE" once, before training
    folder = work / "img" / "1_cat"
    latents, captions = [], []
    with torch.no_grad():
        for path in sorted(folder.glob("*.png")):
            arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            latents.append(shared.vae_encode(torch.from_numpy(arr).permute(2, 0, 1)[None])[0])
            captions.append(path.with_suffix(".txt").read_text().strip())
    gen = torch.Generator().manual_seed(setup["seed"])
    batch, n = setup["batch"], len(latents)
    times, losses = [], []
    step = 0
    unet.train()
    while step < total:
        order = torch.randperm(n, generator=gen).tolist()
        for k in range(0, n - batch + 1, batch):
            if step >= total:
                break
            t0 = time.perf_counter()
            idx = order[k:k + batch]
            x0 = torch.stack([latents[i] for i in idx])
            with torch.no_grad():
                context = shared.encode_text(tokenize([captions[i] for i in idx]))
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            noisy = noise_scheduler.add_noise(x0, noise, timesteps)
            pred = unet(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            step += 1
            times.append(time.perf_counter() - t0)
            losses.append(value)
            if step == 1:
                out["first_step_at"] = time.perf_counter() - t_start
            if step % 5 == 0 or step == total:
                log(f"  [ref] step {step}/{total} loss {value:.4f}")
    out["train_hwm"] = proc_status("VmHWM")
    w = setup["warmup"]
    out["step_times"] = times[w:]
    out["losses"] = losses[w:]


# ---- full-size SD1.5 from a checkpoint: ours and kohya's train_network.py ----------------------------------
def checkpoint_setup(work: Path, args) -> dict:
    setup = dict(checkpoint=str(args.checkpoint), webui=str(args.webui), kohya=str(args.kohya), threads=args.threads,
                 seed=args.seed, warmup=args.kohya_warmup, steps=args.kohya_steps, batch=2, rank=16, size=args.kohya_size,
                 images=args.kohya_images)
    make_images(work / "img" / "1_cat", setup["images"], setup["size"])
    (work / "checkpoint.json").write_text(json.dumps(setup))
    return setup


def child_ckpt_ours(work: Path, setup: dict, out: dict) -> None:
    from lib_lora.train import TrainConfig, Trainer
    from lib_lora.train.loader import load_checkpoint

    total = setup["warmup"] + setup["steps"]
    cfg = TrainConfig(pretrained_model_name_or_path=setup["checkpoint"], webui=setup["webui"],
                      train_data_dir=str(work / "img"), resolution=str(setup["size"]), enable_bucket=False,
                      train_batch_size=setup["batch"], network_dim=setup["rank"], network_alpha=float(setup["rank"]),
                      network_train_unet_only=True, learning_rate=1e-4, optimizer_type="AdamW", lr_scheduler="constant",
                      max_grad_norm=1.0, max_train_steps=total, seed=setup["seed"], cache_latents=True,
                      mixed_precision="no", save_state=False, sdpa=True, output_dir=str(work / f"out-ours-{os.getpid()}"),
                      output_name="bench")
    bundle = load_checkpoint(cfg, log=lambda m: log(f"  [ours] {m}"))
    out["setup_hwm"] = proc_status("VmHWM")
    out["peak_reset"] = reset_peak()
    out["rss0"] = proc_status("VmRSS")
    trainer = Trainer(cfg, bundle, log_fn=lambda m: log(f"  [ours] {m}"))
    stamps: list[float] = []

    def progress(p) -> None:
        if p.phase != "training":
            return
        stamps.append(time.perf_counter())
        if p.step == total:
            out["train_hwm"] = proc_status("VmHWM")
            out["modules"] = len(trainer.network.loras)
        if p.step % 4 == 0 or p.step == total:
            log(f"  [ours] step {p.step}/{total} loss {p.loss:.4f}")

    trainer.run(progress)
    out["step_times"] = [b - a for a, b in zip(stamps[setup["warmup"] - 1:], stamps[setup["warmup"]:])]


def child_ckpt_kohya(work: Path, setup: dict, out: dict) -> None:
    """kohya's train_network.py main, run in this process from the sd-scripts folder given: the model load is
    wrapped to reset the peak after it, the progress bar to time each optimizer step."""
    sys.path.insert(0, setup["kohya"])
    os.chdir(setup["kohya"])
    import train_network
    from library import train_util

    total = setup["warmup"] + setup["steps"]
    load = train_util.load_target_model

    def load_and_reset(*a, **kw):
        models = load(*a, **kw)
        out["setup_hwm"] = proc_status("VmHWM")
        out["peak_reset"] = reset_peak()
        out["rss0"] = proc_status("VmRSS")
        return models

    train_util.load_target_model = load_and_reset
    stamps: list[float] = []

    class Timed(train_network.tqdm):
        def update(self, n=1):
            stamps.append(time.perf_counter())
            if len(stamps) == total:
                out["train_hwm"] = proc_status("VmHWM")
            return super().update(n)

    train_network.tqdm = Timed
    argv = ["--pretrained_model_name_or_path", setup["checkpoint"], "--train_data_dir", str(work / "img"),
            "--resolution", str(setup["size"]), "--output_dir", str(work / f"out-kohya-{os.getpid()}"),
            "--output_name", "bench", "--network_module", "networks.lora", "--network_dim", str(setup["rank"]),
            "--network_alpha", str(setup["rank"]), "--network_train_unet_only", "--train_batch_size",
            str(setup["batch"]), "--max_train_steps", str(total), "--learning_rate", "1e-4", "--unet_lr", "1e-4",
            "--optimizer_type", "AdamW", "--lr_scheduler", "constant", "--max_grad_norm", "1.0", "--mixed_precision",
            "no", "--save_precision", "float", "--cache_latents", "--sdpa", "--seed", str(setup["seed"]),
            "--max_data_loader_n_workers", "0", "--caption_extension", ".txt"]
    parser = train_network.setup_parser()
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    trainer = train_network.NetworkTrainer()
    trainer.train(args)
    out["modules"] = 192
    out["step_times"] = [b - a for a, b in zip(stamps[setup["warmup"] - 1:], stamps[setup["warmup"]:])]


def child_main(variant: str, work: Path, result: Path) -> int:
    if variant.startswith("ckpt-"):
        setup = json.loads((work / "checkpoint.json").read_text())
    else:
        setup = json.loads((work / "setup.json").read_text())
    torch.set_num_threads(setup["threads"])
    out: dict = {"variant": variant, "load_start": loadavg()}
    if variant == "ref":
        child_ref(work, setup, out)
    elif variant == "ckpt-ours":
        child_ckpt_ours(work, setup, out)
    elif variant == "ckpt-kohya":
        child_ckpt_kohya(work, setup, out)
    else:
        child_ours(work, setup, variant, out)
    out["load_end"] = loadavg()
    out["process_hwm"] = max(out["setup_hwm"], out["train_hwm"])
    result.write_text(json.dumps(out))
    return 0


def run_child(variant: str, work: Path, threads: int, python: str = sys.executable, env_extra: dict | None = None) -> dict:
    result = work / f"result-{variant}-{time.time_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), BENCH_TRAIN_EPOCH=str(EPOCH),
               PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error", **(env_extra or {}))
    t = time.perf_counter()
    proc = subprocess.run([python, __file__, "--child", variant, "--work", str(work), "--result", str(result)],
                          check=False, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"child {variant} failed with exit code {proc.returncode}")
    out = json.loads(result.read_text())
    out["wall"] = time.perf_counter() - t
    out["speed"] = 1 / statistics.median(out["step_times"])
    out["speed_total"] = len(out["step_times"]) / sum(out["step_times"])
    out["speed_best"] = 1 / min(out["step_times"])
    out.setdefault("process_hwm", max(out["setup_hwm"], out["train_hwm"]))
    log(f"{variant}: {out['speed']:.3f} steps/s (1 / median step; {out['speed_total']:.3f} over all "
        f"{len(out['step_times'])} timed steps, best step {1 / out['speed_best']:.3f} s), training peak RSS "
        f"{mb(out['train_hwm'])} (+{mb(out['train_hwm'] - out['rss0'])} over the loaded model), process peak {mb(out['process_hwm'])}; wall {out['wall']:.0f} s; "
        f"load {out['load_start']} → {out['load_end']}")
    return out


# ---- the table --------------------------------------------------------------------------------------
def print_rows(header: list[str], rows: list[tuple]) -> None:
    """A markdown table, after a blank line."""
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")

def print_table(res: dict[str, list[dict]], setup: dict, info: dict, machine: str) -> None:
    med = statistics.median
    ours, ref = res["ours"], res["ref"]
    pairs = list(zip(ours, ref))
    speed_ratio = med([o["speed"] / r["speed"] for o, r in pairs])
    total_ratio = med([o["speed_total"] / r["speed_total"] for o, r in pairs])
    best_ratio = max(o["speed_best"] for o in ours) / max(r["speed_best"] for r in ref)
    peak = {k: med([x["train_hwm"] for x in v]) for k, v in res.items()}
    extra = {k: med([x["train_hwm"] - x["rss0"] for x in v]) for k, v in res.items()}
    proc = {k: med([x["process_hwm"] for x in v]) for k, v in res.items()}
    speed = {k: med([x["speed"] for x in v]) for k, v in res.items()}
    speed_total = {k: med([x["speed_total"] for x in v]) for k, v in res.items()}
    loss = {k: med([statistics.fmean(x["losses"]) for x in v]) for k, v in res.items()}
    mem_ratio = peak["ours"] / peak["ref"]
    extra_ratio = extra["ours"] / extra["ref"]

    def yes(b: bool) -> str:
        return "yes" if b else "**no**"

    rows = [
        ("steps/s (1 / median step time)", f"{speed['ours']:.3f}", f"{speed['ref']:.3f}",
         f"{speed_ratio:.3f}× [best-of {best_ratio:.3f}×]", "≥ 1.0×", yes(speed_ratio >= 1.0)),
        ("steps/s (timed steps / their total time; load spikes included)", f"{speed_total['ours']:.3f}",
         f"{speed_total['ref']:.3f}", f"{total_ratio:.3f}×", "", ""),
        ("median step time", f"{1 / speed['ours']:.3f} s", f"{1 / speed['ref']:.3f} s", "", "", ""),
        ("peak RSS of the training job (VmHWM)", mb(peak["ours"]), mb(peak["ref"]), f"{mem_ratio:.2f}×", "≤ 1.0×",
         yes(mem_ratio <= 1.0)),
        ("  of which above the loaded model", mb(extra["ours"]), mb(extra["ref"]), f"{extra_ratio:.2f}×", "≤ 1.0×",
         yes(extra_ratio <= 1.0)),
        ("(info) process peak incl. imports and weight loading", mb(proc["ours"]), mb(proc["ref"]),
         f"{proc['ours'] / proc['ref']:.2f}×", "", ""),
        ("LoRA modules / trainable parameters", f"{ours[0]['modules']} / {ours[0]['trainable']:,}",
         f"{ref[0]['modules']} / {ref[0]['trainable']:,}", "", "equal",
         yes(ours[0]["modules"] == ref[0]["modules"] and ours[0]["trainable"] == ref[0]["trainable"])),
        ("(sanity) mean loss over the timed steps", f"{loss['ours']:.4f}", f"{loss['ref']:.4f}", "", "", ""),
    ]
    if "ours-ldm-attn" in res:
        k = "ours-ldm-attn"
        rows += [
            ("(info) ours on stock ldm attention: steps/s", f"{speed[k]:.3f}", f"{speed['ref']:.3f}",
             f"{speed[k] / speed['ref']:.2f}×", "", ""),
            ("(info) ours on stock ldm attention: peak RSS of the training job", mb(peak[k]), mb(peak["ref"]),
             f"{peak[k] / peak['ref']:.2f}× (+{mb(extra[k])} above the model)", "", ""),
        ]
    nr = len(pairs)
    print()
    print(f"Machine: {machine}")
    print()
    print(f"Config: SD1 UNet topology at width {setup['channels']} ({info['params'] / 1e6:.1f} M parameters, "
          f"context {CONTEXT_DIM}), {setup['size']}×{setup['size']} images → {setup['size'] // 8}×{setup['size'] // 8} "
          f"cached latents, {setup['images']} images, batch {setup['batch']}, LoRA rank {setup['rank']} alpha "
          f"{setup['rank']} on {ours[0]['modules']} modules, text encoder frozen, AdamW lr 1e-4, grad clip 1.0, DDPM "
          f"scaled_linear ε-loss, fp32, CPU, {setup['threads']} threads; {setup['warmup']} warm-up + "
          f"{setup['steps']} timed steps per run, {nr} alternating round(s).")
    print_rows(["metric", "ours (lib_lora Trainer)", "diffusers + peft", "ours / theirs", "target", "met?"], rows)
    print()
    print(f"Values are medians over rounds; speed ratios are medians of per-round ratios (each round runs both "
          f"loops back to back, order alternating); best-of is ours' fastest step over theirs'. Each loop runs in its own "
          f"process; peak RSS is reset after imports and weight loading and read after the last timed step. Same "
          f"weights in both UNets (diffusers' own `convert_ldm_unet_checkpoint`; outputs agree to "
          f"{info['diff_sdp']:.1e} with the WebUI's sdp attention, {info['diff_stock']:.1e} with ldm's stock "
          f"attention; diffusers uses {info['attn_processor']}).")
    sys.stdout.flush()


def print_checkpoint_table(res: dict[str, list[dict]], setup: dict, machine: str) -> None:
    med = statistics.median
    ours, ref = res["ckpt-ours"], res["ckpt-kohya"]
    pairs = list(zip(ours, ref))
    speed_ratio = med([o["speed"] / r["speed"] for o, r in pairs])
    total_ratio = med([o["speed_total"] / r["speed_total"] for o, r in pairs])
    speed = {k: med([x["speed"] for x in v]) for k, v in res.items()}
    peak = {k: med([x["train_hwm"] for x in v]) for k, v in res.items()}
    extra = {k: med([x["train_hwm"] - x["rss0"] for x in v]) for k, v in res.items()}
    proc = {k: med([x["process_hwm"] for x in v]) for k, v in res.items()}

    def yes(b: bool) -> str:
        return "yes" if b else "**no**"

    mem_ratio = peak["ckpt-ours"] / peak["ckpt-kohya"]
    rows = [
        ("steps/s (1 / median step time)", f"{speed['ckpt-ours']:.3f}", f"{speed['ckpt-kohya']:.3f}",
         f"{speed_ratio:.3f}×", "≥ 1.0×", yes(speed_ratio >= 1.0)),
        ("steps/s (timed steps / their total time)", f"{med([x['speed_total'] for x in ours]):.3f}",
         f"{med([x['speed_total'] for x in ref]):.3f}", f"{total_ratio:.3f}×", "", ""),
        ("peak RSS after the model is loaded (caching + training)", mb(peak["ckpt-ours"]), mb(peak["ckpt-kohya"]),
         f"{mem_ratio:.2f}×", "≤ 1.0×", yes(mem_ratio <= 1.0)),
        ("  of which above the loaded model", mb(extra["ckpt-ours"]), mb(extra["ckpt-kohya"]),
         f"{extra['ckpt-ours'] / extra['ckpt-kohya']:.2f}×", "", ""),
        ("(info) process peak incl. loading the checkpoint", mb(proc["ckpt-ours"]), mb(proc["ckpt-kohya"]),
         f"{proc['ckpt-ours'] / proc['ckpt-kohya']:.2f}×", "", ""),
    ]
    print()
    print(f"Machine: {machine}")
    print()
    print(f"Config: {os.path.basename(setup['checkpoint'])} (full-size SD1.5), {setup['images']} images "
          f"{setup['size']}×{setup['size']} → {setup['size'] // 8}×{setup['size'] // 8} cached latents, batch "
          f"{setup['batch']}, LoRA rank {setup['rank']} alpha {setup['rank']} on the UNet's {ours[0]['modules']} "
          f"transformer-block modules (text encoder frozen, run every step by both), AdamW lr 1e-4, constant, clip 1.0, "
          f"fp32, --sdpa on both, CPU, {setup['threads']} threads; {setup['warmup']} warm-up + {setup['steps']} timed "
          f"steps per run, {len(pairs)} alternating round(s) (kohya first).")
    print_rows(["metric", "ours (python -m lib_lora.train)", "kohya train_network.py", "ours / kohya", "target", "met?"],
               rows)
    sys.stdout.flush()


def checkpoint_comparison(args, machine: str) -> None:
    env = {"HF_HOME": str(args.webui.parent / "hf-home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if os.environ.get("HF_HOME"):
        env["HF_HOME"] = os.environ["HF_HOME"]
    with tempfile.TemporaryDirectory(prefix="lora-train-bench-ckpt-") as tmp:
        work = Path(tmp)
        setup = checkpoint_setup(work, args)
        res: dict[str, list[dict]] = {"ckpt-ours": [], "ckpt-kohya": []}
        for r in range(max(1, args.kohya_rounds)):
            for v, python in (("ckpt-kohya", args.kohya_python), ("ckpt-ours", args.ours_python)):
                log(f"round {r + 1}: {VARIANTS[v]} ...")
                res[v].append(run_child(v, work, args.threads, python=python, env_extra=env))
    print_checkpoint_table(res, setup, machine + f", load average {loadavg()} at the end")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of ours / diffusers+peft")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels (SD1: 320)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget", type=float, default=420.0, help="no new round after this many seconds")
    ap.add_argument("--no-ldm-attn", action="store_true", help="skip the stock-ldm-attention run")
    ap.add_argument("--kohya", type=Path, help="an sd-scripts checkout: also compare with its train_network.py")
    ap.add_argument("--kohya-python", help="a Python that has sd-scripts' requirements")
    ap.add_argument("--ours-python", default=sys.executable, help="the Python running ours from the checkpoint "
                    "(needs the WebUI's packages; default: this one)")
    ap.add_argument("--webui", type=Path, default=BED / "webui", help="the WebUI whose ldm code builds our model")
    ap.add_argument("--checkpoint", type=Path, default=BED / "webui" / "models" / "Stable-diffusion" / "random-sd15.safetensors")
    ap.add_argument("--kohya-rounds", type=int, default=2)
    ap.add_argument("--kohya-steps", type=int, default=8, help="timed steps per checkpoint run")
    ap.add_argument("--kohya-warmup", type=int, default=2)
    ap.add_argument("--kohya-size", type=int, default=128, help="image side of the checkpoint comparison (the latent is 1/8)")
    ap.add_argument("--kohya-images", type=int, default=8)
    ap.add_argument("--kohya-only", action="store_true", help="skip the diffusers + peft comparison")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, Path(args.work), Path(args.result))
    if args.warmup < 1 or args.steps < 1 or args.kohya_warmup < 1:
        ap.error("--warmup, --kohya-warmup and --steps must be at least 1")
    if args.kohya and not args.kohya_python:
        ap.error("--kohya needs --kohya-python (a Python with sd-scripts' requirements)")

    machine = (f"torch {torch.__version__}, {args.threads} threads, CPU: {cpu_model()} ({os.cpu_count()} logical "
               f"cores visible), Python {platform.python_version()}")
    load_start = loadavg()
    log(f"{machine}; load average {load_start}")
    if args.kohya:
        checkpoint_comparison(args, machine)
        if args.kohya_only:
            return 0
    setup = dict(channels=args.channels, threads=args.threads, seed=args.seed, warmup=args.warmup, steps=args.steps,
                 batch=2, rank=16, size=256, images=args.images)
    with tempfile.TemporaryDirectory(prefix="lora-train-bench-") as tmp:
        work = Path(tmp)
        log("building the UNet, converting it for diffusers, writing images ...")
        info = prepare(work, setup)
        log(f"  {info['params'] / 1e6:.1f} M parameters; ldm (sdp) vs diffusers max |diff| {info['diff_sdp']:.1e}, "
            f"stock ldm vs diffusers {info['diff_stock']:.1e} (outputs up to {info['scale']:.1f})")
        res: dict[str, list[dict]] = {"ours": [], "ref": []}
        round_time = None
        for r in range(max(1, args.rounds)):
            elapsed = time.perf_counter() - T0
            if r and round_time and elapsed + round_time > args.budget:
                log(f"budget: stopping after {r} round(s)")
                break
            t = time.perf_counter()
            order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
            for v in order:
                log(f"round {r + 1}: {VARIANTS[v]} ...")
                res[v].append(run_child(v, work, args.threads))
            round_time = time.perf_counter() - t
        if not args.no_ldm_attn:
            log(f"{VARIANTS['ours-ldm-attn']} ...")
            res["ours-ldm-attn"] = [run_child("ours-ldm-attn", work, args.threads)]
    machine += f", load average {load_start} at start, {loadavg()} at the end (1/5/15 min)"
    print_table(res, setup, info, machine)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
