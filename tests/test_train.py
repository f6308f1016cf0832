"""The trainer (lib_lora.train) on the tiny real ldm SD1 model and a generated kohya image folder.

The "VAE" is a fixed 8x average pool plus a random 1x1 conv to 4 channels and the tokenizer hashes words,
so every latent and token is deterministic without any download.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import lib_lora
import models
from helpers import te_out, unet_out
from lib_lora import hashes
from lib_lora.errors import LoraError
from lib_lora.safetensors_io import load_safetensors
from lib_lora.train import ModelBundle, Progress, SamplePrompt, TrainConfig, Trainer
from lib_lora.train.cache import LatentCache
from lib_lora.train.config import from_args
from lib_lora.train.dataset import Buckets, Dataset, View, bucket_resolutions, process_caption
from lib_lora.train.loop import overfit_warning
from lib_lora.train.metadata import kohya_hashes, write_network
from lib_lora.train.model import NoiseSchedule
from lib_lora.train.optim import Lion, build_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(64, 64), (64, 64), (64, 96), (64, 96)]


# ---- fixtures: images, model, bundle ---------------------------------------------------------------
def make_images(folder: str, sizes=SIZES, captions: bool = True) -> None:
    os.makedirs(folder, exist_ok=True)
    for n, size in enumerate(sizes):
        im = Image.new("RGB", size, (250, 250, 250))
        ImageDraw.Draw(im).ellipse([8, 8, size[0] - 8, size[1] - 8], fill=(60 * n % 255, 200, 255 - 50 * n))
        im.save(os.path.join(folder, f"img{n}.png"))
        if captions:
            with open(os.path.join(folder, f"img{n}.txt"), "w") as f:
                f.write(f"cat, color{n}, round")


def tokenize(captions: list[str]) -> torch.Tensor:
    out = torch.ones(len(captions), models.CONTEXT_LENGTH, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [0] + [2 + zlib.crc32(w.encode()) % (models.TINY_VOCAB - 2) for w in caption.replace(",", " ").split()]
        out[i, :min(len(ids), 77)] = torch.tensor(ids[:77])
    return out


VAE_WEIGHT = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))


def vae_encode(pixels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(pixels, 8), VAE_WEIGHT)


def make_bundle(model: torch.nn.Module, vae_id: str = "tiny-vae-0", **kw) -> ModelBundle:
    te = model.cond_stage_model.wrapped.transformer
    return ModelBundle(model, vae_encode, tokenize, lambda t: te(t).last_hidden_state, vae_id=vae_id, **kw)


def cli_bundle(cfg: TrainConfig) -> ModelBundle:
    """The CLI test's model_factory."""
    return make_bundle(models.sd_model("sd1", seed=0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second intra-op thread only adds synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    return models.sd_model("sd1", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_images(str(root / "img" / "5_cat"))
    ckpt = root / "base.ckpt"
    ckpt.write_bytes(bytes(range(256)) * 4500)  # > 1 MiB + 64 KiB, so the legacy hash reads real bytes
    return root


def config(data, **kw) -> TrainConfig:
    values = dict(train_data_dir=str(data / "img"), resolution="64", min_bucket_reso=64, max_bucket_reso=128,
                  output_dir=str(data / "out"), output_name="cat", train_batch_size=1, seed=1)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(base, data):
    """One 24-step run shared by the loss, reproduction, metadata, cache and curve tests."""
    prompts = data / "prompts.txt"
    prompts.write_text("a cat\n# comment\nanother cat --n ugly, blurry --w 517 --h 768 --s 5000 --l 6.5 --d 42 --ss euler_a\n")
    cfg = config(data, max_train_steps=24, learning_rate=1e-2, network_alpha=4.0, validation_split=0.25,
                 validate_every_n_steps=8, save_every_n_epochs=1, shuffle_caption=True, keep_tokens=1,
                 flip_aug=True, cache_latents_to_disk=True, pretrained_model_name_or_path=str(data / "base.ckpt"),
                 sample_prompts=str(prompts), sample_every_n_epochs=1, training_comment="tiny test")
    model = copy.deepcopy(base)
    samples = []

    def sample_fn(prompts: list[str], step: int) -> list[Image.Image]:
        samples.append((prompts, step))
        return [Image.new("RGB", (8, 8)) for _ in prompts]

    events: list[Progress] = []
    trainer = Trainer(cfg, make_bundle(model, sample_fn=sample_fn), log_fn=lambda m: None)
    result = trainer.run(events.append)
    return dict(cfg=cfg, model=model, trainer=trainer, result=result, events=events, samples=samples)


# ---- (1) learning ------------------------------------------------------------------------------------
def test_loss_falls(trained):
    r = trained["result"]
    losses = [x for _, x in r.losses]
    assert not r.cancelled and r.step == 24 and len(losses) == 24
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first - 0.15, (first, last, losses)
    assert len(r.val_losses) == 3 and [s for s, _ in r.val_losses] == [8, 16, 24]
    ticks = [e for e in trained["events"] if e.phase == "training"]
    assert ticks[-1].step == 24 and ticks[-1].eta_s == 0 and ticks[-1].it_per_s > 0 and ticks[-1].total_epochs == 2


# ---- (2) the file reproduces the trained model ------------------------------------------------------
def test_saved_file_reproduces_hooked_model(trained, base):
    trainer, model = trained["trainer"], trained["model"]
    path = trained["result"].output
    assert os.path.basename(path) == "cat.safetensors"
    net = lib_lora.load(path)
    assert net.format == "kohya" and net.base_model == "sd1" and net.rank == 4 and net.alpha == 4.0
    assert len(net.modules) == len(trainer.network.loras) and not net.unmatched
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in trainer.network.loras)  # kohya naming
    fresh = copy.deepcopy(base)
    res = lib_lora.Patcher(fresh).apply([lib_lora.Use(net)], mode="merge")
    assert not res.skipped and len(res.matched) == len(net.modules)
    trainer.network.eval()
    trainer.network.attach()
    try:
        hooked_u, hooked_t = unet_out(model), te_out(model)
    finally:
        trainer.network.detach()
    merged_u, merged_t = unet_out(fresh), te_out(fresh)
    assert (hooked_u - unet_out(base)).abs().max() > 1e-3, "training changed nothing"
    torch.testing.assert_close(merged_u, hooked_u, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_t, hooked_t, atol=1e-5, rtol=0)
    assert torch.equal(unet_out(model), unet_out(base)), "the trained model must be given back untouched"
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in base.parameters()]


# ---- (3) metadata and hashes -----------------------------------------------------------------------
def test_metadata_kohya_formats(trained, data):
    path = trained["result"].output
    _, md = load_safetensors(path)
    assert all(isinstance(v, str) for v in md.values())
    want = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
            "ss_network_dropout": "None", "ss_base_model_version": "sd_v1", "ss_v2": "False",
            "ss_resolution": "(64, 64)", "ss_num_epochs": "2", "ss_epoch": "2", "ss_steps": "24",
            "ss_max_train_steps": "24", "ss_learning_rate": "0.01", "ss_unet_lr": "None", "ss_text_encoder_lr": "None",
            "ss_optimizer": "torch.optim.adamw.AdamW", "ss_output_name": "cat", "ss_lr_scheduler": "constant",
            "ss_num_train_images": "15", "ss_num_validation_images": "1", "ss_num_reg_images": "0",
            "ss_num_batches_per_epoch": "15", "ss_seed": "1", "ss_cache_latents": "True", "ss_flip_aug": "True",
            "ss_shuffle_caption": "True", "ss_keep_tokens": "1", "ss_training_comment": "tiny test",
            "ss_sd_model_name": "base.ckpt", "ss_sd_model_hash": hashes.legacy_hash(str(data / "base.ckpt")),
            "ss_new_sd_model_hash": hashes.sha256(str(data / "base.ckpt")), "ss_total_batch_size": "1",
            "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "cat",
            "modelspec.resolution": "64x64", "modelspec.prediction_type": "epsilon"}
    assert {k: md.get(k) for k in want} == want
    assert json.loads(md["ss_dataset_dirs"]) == {"5_cat": {"n_repeats": 5, "img_count": 3}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {}
    freq = json.loads(md["ss_tag_frequency"])["5_cat"]
    assert freq["cat"] == 3 and freq["round"] == 3 and sum(v == 1 for k, v in freq.items() if k.startswith("color")) == 3
    buckets = json.loads(md["ss_bucket_info"])
    assert [b["resolution"] for b in buckets["buckets"].values()] == [[64, 64]] and "mean_img_ar_error" in buckets
    float(md["ss_training_started_at"]), float(md["ss_training_finished_at"]), int(md["ss_session_id"])
    assert "ss_network_args" not in md  # kohya writes it only with network_args
    # sshs_*: kohya hashes the file as it would be written with only the ss_* keys
    assert md["sshs_model_hash"] == hashes.addnet_hash(path)
    tensors = load_file(path)
    ss_only = str(data / "ss_only.safetensors")
    save_file(tensors, ss_only, {k: v for k, v in md.items() if k.startswith("ss_")})
    assert md["sshs_legacy_hash"] == hashes.legacy_hash(ss_only)


def test_kohya_hashes_of_a_file_over_one_mebibyte(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(4, 200_000, generator=g),
               "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=g), "lora_unet_a.alpha": torch.tensor(4.0)}
    md = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "x"}
    path, ss_only = str(tmp_path / "x.safetensors"), str(tmp_path / "ss.safetensors")
    write_network(path, tensors, md)
    save_file(tensors, ss_only, {"ss_network_dim": "4", "ss_output_name": "x"})
    _, written = load_safetensors(path)
    assert written["sshs_model_hash"] == hashes.addnet_hash(path) == hashes.addnet_hash(ss_only)
    assert written["sshs_legacy_hash"] == hashes.legacy_hash(ss_only) != hashes.legacy_hash(path)
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == kohya_hashes(tensors, md)


def test_saves_curve_samples_and_disk_cache(trained, data):
    cfg, r = trained["cfg"], trained["result"]
    out = cfg.output_dir
    assert [os.path.basename(p) for p in r.saved] == ["cat-000001.safetensors", "cat.safetensors"]
    assert os.path.isfile(os.path.join(out, "cat-000001-state", "train_state.json"))
    lib_lora.load(os.path.join(out, "cat-000001.safetensors"))
    with Image.open(os.path.join(out, "cat-loss.png")) as im:
        assert im.size == (900, 420)
    assert [([p.prompt for p in ps], step) for ps, step in trained["samples"]] == [(["a cat", "another cat"], 15)]
    plain, options = trained["samples"][0][0]  # epoch 2 is unfinished at step 24
    assert plain == SamplePrompt("a cat")
    assert options == SamplePrompt("another cat", negative_prompt="ugly, blurry", width=512, height=768, steps=1000,
                                   cfg_scale=6.5, seed=42, sampler="euler_a")
    assert sorted(os.listdir(os.path.join(out, "sample")))[0] == "cat_000015_00.png"
    # the disk cache is reused by a later run with the same settings, and keyed by the VAE
    d = Dataset(cfg, cfg.seed)
    bundle = make_bundle(trained["model"])
    jobs = [(i, View()) for i in d.train_items() + d.validation] + [(i, View(flip=True)) for i in d.train_items()]
    disk = os.path.join(cfg.train_data_dir, ".latent_cache")
    cache = LatentCache(bundle.vae_encode, "tiny-vae-0", memory=True, disk_dir=disk)
    cache.fill(jobs, 2)
    assert cache.hits == {"memory": 0, "disk": 7, "encoded": 0}
    other = LatentCache(bundle.vae_encode, "another-vae", memory=False, disk_dir=disk)
    other.fill(jobs[:2], 1)
    assert other.hits["encoded"] == 2


def test_network_weights_start_a_run_from_a_file(trained, base, data):
    start = trained["result"].output
    cfg = config(data, output_dir=str(data / "from-file"), max_train_steps=1, learning_rate=1e-9, save_state=False,
                 network_weights=start)
    trainer = Trainer(cfg, make_bundle(copy.deepcopy(base)), log_fn=lambda m: None)
    trainer.run()
    assert_same_weights(trainer.network.kohya_state_dict(), load_file(start))
    other = str(data / "other.safetensors")
    save_file({"lora_unet_nothing.lora_down.weight": torch.zeros(1, 1)}, other)
    with pytest.raises(LoraError, match="no tensor matches"):
        Trainer(config(data, network_weights=other), make_bundle(copy.deepcopy(base))).run()


# ---- (4) resume and (5) cancel -----------------------------------------------------------------------
def resume_config(data, out: str, **kw) -> TrainConfig:
    """Exercises every piece of state: accumulation, warm-up + cosine, dropout, noise offset, min-SNR, AdamW."""
    return config(data, output_dir=str(data / out), output_name="r", max_train_steps=4, gradient_accumulation_steps=2,
                  lr_scheduler="cosine", lr_warmup_steps=1, network_dropout=0.1, noise_offset=0.1, min_snr_gamma=5.0,
                  learning_rate=1e-3, seed=3, optimizer_args=["weight_decay=0.01"], **kw)


@pytest.fixture(scope="module")
def uninterrupted(base, data):
    model = copy.deepcopy(base)
    trainer = Trainer(resume_config(data, "full", save_every_n_steps=2), make_bundle(model), log_fn=lambda m: None)
    result = trainer.run()
    return trainer.network.kohya_state_dict(), result


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_resume_equals_uninterrupted(base, data, uninterrupted):
    weights, full = uninterrupted
    state = str(data / "full" / "r-step00000002-state")
    assert os.path.isdir(state) and full.step == 4
    trainer = Trainer(resume_config(data, "resumed", resume=state), make_bundle(copy.deepcopy(base)), log_fn=lambda m: None)
    result = trainer.run()
    assert result.step == 4 and not result.warnings
    assert_same_weights(trainer.network.kohya_state_dict(), weights)
    assert result.losses == full.losses


def test_cancel_leaves_loadable_file_and_resumable_state(base, data, uninterrupted):
    trainer = Trainer(resume_config(data, "cancelled"), make_bundle(copy.deepcopy(base)), log_fn=lambda m: None)

    def on_progress(p: Progress) -> None:
        if p.phase == "training" and p.step == 3:
            trainer.cancel()

    result = trainer.run(on_progress)
    assert result.cancelled and result.step == 3
    assert os.path.basename(result.output) == "r-step00000003.safetensors"
    net = lib_lora.load(result.output)
    assert len(net.modules) == len(trainer.network.loras)
    assert lib_lora.load(result.output).metadata["ss_steps"] == "3"
    resumed = Trainer(resume_config(data, "cancelled", resume=result.state), make_bundle(copy.deepcopy(base)),
                      log_fn=lambda m: None)
    assert resumed.run().step == 4
    assert_same_weights(resumed.network.kohya_state_dict(), uninterrupted[0])


def test_resume_refuses_a_folder_without_state(base, data):
    with pytest.raises(LoraError, match="no train_state.json"):
        Trainer(resume_config(data, "x", resume=str(data)), make_bundle(copy.deepcopy(base))).run()


# ---- other network kinds, checkpointing ------------------------------------------------------------
@pytest.mark.parametrize("algo,kind", [("lora", "lora"), ("loha", "loha"), ("lokr", "lokr")])
def test_conv_loha_lokr_files_reproduce_hooked_model(base, data, algo, kind):
    cfg = config(data, output_dir=str(data / f"algo-{algo}"), max_train_steps=1, learning_rate=1e-2, network_algo=algo,
                 network_dim=4 if algo != "lokr" else 2, conv_dim=2, conv_alpha=1.0, network_train_unet_only=True,
                 save_state=False)
    model = copy.deepcopy(base)
    trainer = Trainer(cfg, make_bundle(model), log_fn=lambda m: None)
    net = lib_lora.load(trainer.run().output)
    assert set(net.kind_counts) == {kind} and net.base_model == "sd1" and not net.unmatched
    assert any("resnets_0_conv1" in k for k in trainer.network.loras)
    if algo != "lora":
        assert net.format == "lycoris" and json.loads(net.metadata["ss_network_args"])["algo"] == algo
    fresh = copy.deepcopy(base)
    assert not lib_lora.Patcher(fresh).apply([lib_lora.Use(net)]).skipped
    trainer.network.attach()
    try:
        hooked = unet_out(model)
    finally:
        trainer.network.detach()
    assert (hooked - unet_out(base)).abs().max() > 1e-4
    torch.testing.assert_close(unet_out(fresh), hooked, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_step(base, data):
    """Ours on or off, and ldm's own use_checkpoint on (as SD's configs have it): the same gradients.
    ldm's CheckpointFunction alone would give the hooked parameters none."""
    results = []
    for ours, ldm in ((False, False), (True, True), (False, True)):
        model = copy.deepcopy(base)
        flags = [m for m in model.modules() if isinstance(getattr(m, "checkpoint", None), bool)
                 or isinstance(getattr(m, "use_checkpoint", None), bool)]
        for m in flags:
            for name in ("checkpoint", "use_checkpoint"):
                if hasattr(m, name):
                    setattr(m, name, ldm)
        cfg = config(data, output_dir=str(data / f"ckpt-{ours}-{ldm}"), max_train_steps=1, learning_rate=1e-2,
                     gradient_checkpointing=ours, save_state=False)
        trainer = Trainer(cfg, make_bundle(model), log_fn=lambda m: None)
        trainer.run()
        results.append(trainer.network.kohya_state_dict())
        assert flags and all(getattr(m, name, ldm) == ldm for m in flags for name in ("checkpoint", "use_checkpoint"))
        assert all("forward" not in m.__dict__ for m in model.modules())
    assert_same_weights(results[0], results[1])
    assert_same_weights(results[0], results[2])


# ---- CLI and config ----------------------------------------------------------------------------------
def test_cli_trains_from_toml_with_flag_overrides(data, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\nmodel_factory = "test_train:cli_bundle"\n[data]\ntrain_data_dir = "{data / "img"}"\n'
                    f'resolution = 64\nmin_bucket_reso = 64\n[train]\nmax_train_steps = 50\nseed = 5\n'
                    f'output_dir = "{tmp_path / "out"}"\noutput_name = "cli"\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lib_lora.train", "--config", str(toml), "--max_train_steps", "2",
                           "--network-dim", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "steps 2/2" in proc.stdout and "it/s ETA" in proc.stdout
    net = lib_lora.load(str(tmp_path / "out" / "cli.safetensors"))
    assert net.rank == 2 and net.metadata["ss_steps"] == "2" and net.metadata["ss_seed"] == "5"
    toml.write_text("max_train_step = 5\n")
    bad = subprocess.run([sys.executable, "-m", "lib_lora.train", "--config", str(toml)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "unknown option 'max_train_step' (did you mean 'max_train_steps'?)" in bad.stderr


def test_config_toml_flags_and_kohya_names(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[general]\nnetwork_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "conv_dim=8"]\n'
                    'learning_rate = 1\nresolution = [512, 768]\n')
    cfg, _ = from_args(["--config", str(toml), "--network_dim", "16", "--no-enable_bucket", "--optimizer_args",
                        "weight_decay=0.1", "betas=0.9,0.99"])
    assert (cfg.network_algo, cfg.conv_dim, cfg.network_dim, cfg.learning_rate) == ("loha", 8, 16, 1.0)
    assert cfg.resolution_wh() == (512, 768) and cfg.enable_bucket is False and cfg.network_module == "lycoris.kohya"
    assert cfg.network_args() == {"algo": "loha", "conv_dim": "8", "conv_alpha": "1.0"}
    toml.write_text("learning_rat = 1e-4\n")
    with pytest.raises(LoraError, match="did you mean 'learning_rate'"):
        TrainConfig.from_toml(str(toml))
    with pytest.raises(LoraError, match="lr_scheduler must be one of"):
        TrainConfig(lr_scheduler="cosin")
    with pytest.raises(LoraError, match="bucket_reso_steps"):
        TrainConfig(bucket_reso_steps=32)


# ---- (6) dataset: buckets, repeats, captions, messages -----------------------------------------------
def test_bucket_resolutions_and_assignment_match_kohya():
    assert bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    b = Buckets((512, 512), 256, 1024, 64)
    assert b.assign(512, 768)[:2] == ((384, 640), (427, 640))
    assert b.assign(1000, 1000)[:2] == ((512, 512), (512, 512))
    assert b.assign(384, 640)[:2] == ((384, 640), (384, 640))
    small = Buckets((512, 512), 256, 1024, 64, no_upscale=True)
    assert small.assign(300, 200)[:2] == ((256, 192), (300, 200))
    assert small.assign(1024, 1024)[:2] == ((512, 512), (512, 512))
    assert Buckets((512, 768), 256, 1024, 64, enabled=False).assign(600, 600)[:2] == ((512, 768), (768, 768))


def test_dataset_buckets_repeats_and_batches(tmp_path):
    make_images(str(tmp_path / "img" / "5_cat"))
    cfg = TrainConfig(train_data_dir=str(tmp_path / "img"), resolution="96", min_bucket_reso=64, max_bucket_reso=128,
                      train_batch_size=2)
    d = Dataset(cfg)
    assert [(i.size, i.bucket, i.resized) for i in d.train_items()] == [
        ((64, 64), (64, 64), (64, 64)), ((64, 64), (64, 64), (64, 64)),
        ((64, 96), (64, 128), (85, 128)), ((64, 96), (64, 128), (85, 128))]
    assert d.num_train_images == 20 and d.batches_per_epoch() == 10
    batches = d.epoch_batches(seed=1, epoch=1)
    assert len(batches) == 10 and all(len({i.bucket for i in b}) == 1 for b in batches)
    counts = {}
    for b in batches:
        for i in b:
            counts[i.path] = counts.get(i.path, 0) + 1
    assert sorted(counts.values()) == [5, 5, 5, 5]
    assert batches == d.epoch_batches(seed=1, epoch=1) != d.epoch_batches(seed=1, epoch=2)
    cfg.bucket_no_upscale = True
    assert {i.bucket for i in Dataset(cfg).train_items()} == {(64, 64)}


def test_dataset_messages_reg_and_validation(tmp_path):
    root = tmp_path / "img"
    make_images(str(root / "3_red dog"), sizes=[(64, 64), (64, 64)], captions=False)
    (root / "3_red dog" / "img0.txt").write_text("  red, dog ,\n big  ")
    (root / "3_red dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "2_empty").mkdir()
    (root / "notes").mkdir()
    make_images(str(tmp_path / "reg" / "1_dog"), sizes=[(64, 64)] * 2, captions=False)
    cfg = TrainConfig(train_data_dir=str(root), reg_data_dir=str(tmp_path / "reg"), resolution="64",
                      min_bucket_reso=64, caption_extension=".txt")
    d = Dataset(cfg)
    text = "\n".join(d.warnings)
    assert "broken.png: skipped, unreadable image" in text and "2_empty: skipped, no readable images" in text
    assert "notes: skipped, the folder name is not" in text and "1 of 2 images have no .txt caption" in text
    assert sorted(i.caption for i in d.train_items()) == ["red dog", "red, dog , big"]
    assert d.num_train_images == 6 and d.num_reg_images == 6 and all(i.repeats == 3 for i in d.reg_items())
    assert json.loads(json.dumps(d.tag_frequency()))["3_red dog"] == {"red": 1, "dog": 1, "big": 1, "red dog": 1}
    cfg.validation_split = 0.5
    d = Dataset(cfg)
    assert len(d.validation) == 1 and d.validation[0] not in d.train_items() and d.num_train_images == 3
    with pytest.raises(LoraError, match="no usable training images"):
        Dataset(TrainConfig(train_data_dir=str(root / "2_empty")))
    with pytest.raises(LoraError, match="does not exist"):
        Dataset(TrainConfig(train_data_dir=str(tmp_path / "nope")))


def test_caption_shuffle_keep_tokens_and_dropout():
    import random
    cfg = TrainConfig(shuffle_caption=True, keep_tokens=1)
    seen = {process_caption("cat, a, b, c, d", cfg, random.Random(n), 1) for n in range(20)}
    assert len(seen) > 3
    assert all(s.startswith("cat, ") and sorted(s.split(", ")) == ["a", "b", "c", "cat", "d"] for s in seen)
    cfg = TrainConfig(caption_dropout_every_n_epochs=2, caption_tag_dropout_rate=0.5, keep_tokens=1)
    assert process_caption("cat, a, b", cfg, random.Random(0), 2) == ""
    kept = [process_caption("cat, a, b, c, d, e, f", cfg, random.Random(n), 1) for n in range(10)]
    assert all(k.startswith("cat") for k in kept) and min(len(k.split(",")) for k in kept) < 7


# ---- maths against references ----------------------------------------------------------------------
def test_noise_schedule_matches_diffusers_ddpm():
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        clip_sample=False)
    ns = NoiseSchedule()
    assert torch.equal(ns.alphas_cumprod, ref.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x, n, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 500, 999])
    torch.testing.assert_close(ns.add_noise(x, n, t), ref.add_noise(x, n, t))
    torch.testing.assert_close(ns.velocity(x, n, t), ref.get_velocity(x, n, t))
    snr = ns.snr(t)
    torch.testing.assert_close(ns.loss_weight(t, 5.0, False), torch.minimum(snr, torch.tensor(5.0)) / snr)
    torch.testing.assert_close(ns.loss_weight(t, 5.0, True), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                                  "polynomial"])
def test_schedules_match_diffusers(name):
    get_scheduler = pytest.importorskip("diffusers.optimization").get_scheduler
    cfg = TrainConfig(lr_scheduler=name, lr_warmup_steps=3, lr_scheduler_num_cycles=2, lr_scheduler_power=2.0,
                      learning_rate=0.1)
    mine = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    extra = {"num_cycles": 2} if name == "cosine_with_restarts" else {"power": 2.0} if name == "polynomial" else {}
    a = build_scheduler(cfg, mine, 20)
    b = get_scheduler(name, ref, num_warmup_steps=None if name == "constant" else 3, num_training_steps=20, **extra)
    for _ in range(21):
        assert a.get_last_lr() == pytest.approx(b.get_last_lr(), abs=1e-9)
        mine.step(), ref.step(), a.step(), b.step()


def test_lion_step_and_optional_optimizers():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.0]))
    opt = Lion([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([2.0, -3.0, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 * 0.95 - 0.1, -1.0 * 0.95 + 0.1, 0.0]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.02, -0.03, 0.0]))
    from lib_lora.train.optim import build_optimizer
    for name in ("AdamW8bit", "Prodigy"):
        try:
            build_optimizer(TrainConfig(optimizer_type=name), [{"params": [p]}])
        except LoraError as e:
            assert "package, which is not installed" in e.message
    _, desc = build_optimizer(TrainConfig(optimizer_type="Adafactor", optimizer_args=["warmup_init=False"]),
                              [{"params": [p]}])
    assert desc.endswith("Adafactor(warmup_init=False)")


def test_overfit_warning():
    train = [(s, 2.0 - s / 30) for s in range(1, 31)]
    assert overfit_warning([(10, 1.0), (20, 0.9)], train) is None
    msg = overfit_warning([(10, 1.0), (20, 0.9), (30, 1.1)], train)
    assert "validation loss rose from 0.90000 to 1.10000" in msg and "overfitting" in msg
    assert overfit_warning([(10, 1.0), (20, 1.2)], [(s, 1.0 + s / 30) for s in range(1, 21)]) is None


def test_sd2_v_prediction_bf16_open_clip_names(data):
    """SD2: Linear proj_in, open_clip text encoder saved under kohya's HF names, v-prediction, bf16 autocast."""
    model = models.sd_model("sd2", seed=0)
    base_u, base_t = unet_out(model), te_out(model)
    te = model.cond_stage_model.wrapped.model
    bundle = ModelBundle(model, vae_encode, tokenize, lambda t: models.encode_text(te, t), vae_id="v")
    cfg = config(data, output_dir=str(data / "sd2"), max_train_steps=2, learning_rate=1e-2, v_parameterization=True,
                 mixed_precision="bf16", save_precision="fp16", save_state=False)
    trainer = Trainer(cfg, bundle, log_fn=lambda m: None)
    net = lib_lora.load(trainer.run().output)
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())
    assert net.base_model == "sd2" and not net.unmatched
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in trainer.network.loras
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in trainer.network.loras  # MultiheadAttention
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj" in trainer.network.loras
    assert trainer.network.loras["lora_te_text_model_encoder_layers_0_self_attn_v_proj"].lora_up.weight.abs().max() > 0
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in trainer.network.loras
    md = net.metadata
    assert (md["ss_v2"], md["ss_base_model_version"], md["modelspec.architecture"], md["modelspec.prediction_type"]) == (
        "True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v")
    assert all(t.dtype == torch.float16 for t in load_file(net.path).values())
    trainer.network.attach()
    try:
        hooked_u, hooked_t = unet_out(model), te_out(model)
    finally:
        trainer.network.detach()
    assert torch.equal(unet_out(model), base_u) and torch.equal(te_out(model), base_t)
    fresh = models.sd_model("sd2", seed=0)
    assert not lib_lora.Patcher(fresh).apply([lib_lora.Use(net)]).skipped
    # the file is fp16, the hooked network fp32: compare at fp16 resolution
    torch.testing.assert_close(unet_out(fresh), hooked_u, atol=2e-3, rtol=0)
    torch.testing.assert_close(te_out(fresh), hooked_t, atol=2e-3, rtol=0)
    assert (hooked_t - base_t).abs().max() > 1e-3


# ---- SDXL --------------------------------------------------------------------------------------------
def sdxl_outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet output for fixed inputs (context and y included), and both text conditionings of fixed tokens."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 80, generator=g)
    y = torch.randn(1, models.SDXL_ADM, generator=g)
    with torch.no_grad():
        context, pooled = models.sdxl_encode(model, models.random_tokens())
        return model.model.diffusion_model(x, torch.tensor([10]), ctx, y=y), context, pooled


def test_sdxl_two_text_encoders_size_conditioning_and_kohya_names(data):
    """SDXL: both text encoders (the second's nn.MultiheadAttention q/k/v included) and the UNet train; the
    file has kohya's SDXL names and metadata and, merged by the engine, gives the hooked model's outputs."""
    model = models.tiny_sdxl(seed=0)
    base = sdxl_outputs(model)
    seen = []

    def encode(tokens):
        seen.append(tokens.shape)
        return models.sdxl_encode(model, tokens)

    bundle = ModelBundle(model, vae_encode, tokenize, encode, vae_id="xl")
    cfg = config(data, output_dir=str(data / "sdxl"), max_train_steps=3, learning_rate=1e-2, network_alpha=4.0,
                 resolution="64", save_state=False)
    trainer = Trainer(cfg, bundle, log_fn=lambda m: None)
    net = lib_lora.load(trainer.run().output)
    keys = set(trainer.network.loras)
    for key in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
                "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
                "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "lora_unet_output_blocks_2_1_proj_out"):
        assert key in keys, key
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks")) for k in keys)
    ups = trainer.network.loras["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"].lora_up.weight
    assert ups.abs().max() > 0, "no gradient reached the MultiheadAttention's q/k/v"
    assert net.base_model == "sdxl" and not net.unmatched and len(net.modules) == len(keys)
    md = net.metadata
    assert (md["ss_base_model_version"], md["modelspec.architecture"], md["ss_v2"]) == (
        "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False")
    assert all(not m.__dict__.get("forward") for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(sdxl_outputs(model), base)), "the model must be given back untouched"
    assert any("SDXL was trained at 1024x1024" in w for w in trainer.warnings)
    trainer.network.eval()
    trainer.network.attach()
    try:
        hooked = sdxl_outputs(model)
    finally:
        trainer.network.detach()
    fresh = models.tiny_sdxl(seed=0)
    res = lib_lora.Patcher(fresh).apply([lib_lora.Use(net)], mode="merge")
    assert not res.skipped and not res.errors
    for merged, h, b in zip(sdxl_outputs(fresh), hooked, base):
        assert (h - b).abs().max() > 1e-4
        torch.testing.assert_close(merged, h, atol=1e-5, rtol=1e-5)  # 32 fp32 layers: values up to ~10


def test_sdxl_size_vector_matches_sgm_embedders():
    """y = [pooled | emb(orig h, w) | emb(crop top, left) | emb(target h, w)], 256 per number (sgm's
    ConcatTimestepEmbedderND over ldm's timestep_embedding)."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    from lib_lora.train.model import sdxl_vector

    pooled = torch.randn(2, 48)
    sizes = torch.tensor([[1024.0, 768, 0, 32, 1024, 704], [512, 512, 8, 0, 512, 512]])
    want = torch.cat([pooled] + [timestep_embedding(sizes[:, k], 256) for k in range(6)], dim=1)
    torch.testing.assert_close(sdxl_vector(pooled, sizes), want, atol=1e-6, rtol=0)


# ---- several processes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_like_one_with_double_accumulation(data, tmp_path, launcher):
    """torchrun / accelerate launch with 2 CPU processes (gloo), batch 1 each, against one process with
    gradient accumulation 2: the same batches, noise and summed gradients, so the same weights."""
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    toml = tmp_path / "run.toml"
    toml.write_text(f'model_factory = "test_train:cli_bundle"\ntrain_data_dir = "{data / "img"}"\nresolution = 64\n'
                    f'min_bucket_reso = 64\nmax_bucket_reso = 128\nmax_train_steps = 3\nseed = 3\nlearning_rate = 1e-2\n'
                    f'output_dir = "{tmp_path / "out"}"\noutput_name = "ddp"\nsave_state = false\n'
                    f'validate_every_n_epochs = 1\nvalidation_split = 0.25\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    else:
        # --multi_gpu is accelerate's torchrun path; on a machine without GPUs the processes use gloo on the CPU
        # (accelerate's --cpu runs one process unless mpirun is set up)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29518"]
    proc = subprocess.run(cmd + ["-m", "lib_lora.train", "--config", str(toml)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished at step 3") == 1, proc.stdout  # only the first process reports
    net = lib_lora.load(str(tmp_path / "out" / "ddp.safetensors"))
    assert net.metadata["ss_total_batch_size"] == "2"
    cfg = config(data, output_dir=str(tmp_path / "single"), output_name="one", max_train_steps=3, seed=3,
                 learning_rate=1e-2, gradient_accumulation_steps=2, save_state=False, validation_split=0.25)
    single = Trainer(cfg, cli_bundle(cfg), log_fn=lambda m: None).run()
    want = load_file(single.output)
    got = load_file(net.path)
    assert want.keys() == got.keys()
    moved = max(float(w.abs().max()) for k, w in want.items() if "lora_up" in k)
    assert moved > 1e-3
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


# ---- kohya's loss and noise options ------------------------------------------------------------------
def test_zero_terminal_snr_matches_diffusers_rescale():
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        rescale_betas_zero_snr=True)
    ns = NoiseSchedule(zero_terminal_snr=True)
    torch.testing.assert_close(ns.alphas_cumprod[:-1], ref.alphas_cumprod[:-1], atol=1e-6, rtol=1e-4)
    assert float(ref.alphas_cumprod[-1]) < 1e-9 and float(ns.alphas_cumprod[-1]) == 2.0 ** -24
    assert torch.isfinite(ns.loss_weight(torch.tensor([999]), 5.0, True, debiased=True)).all()


def test_huber_losses_debiased_weights_and_pyramid_noise():
    from lib_lora.train.model import elementwise_loss, pyramid_noise
    ns = NoiseSchedule()
    t = torch.tensor([0, 500, 999])
    c = ns.huber_threshold(t, "snr", 0.1)
    assert c[0] > 0.9 and c[2] < 0.11 and bool((c[:-1] > c[1:]).all())  # from ~1 at t=0 down to ~c
    exp = ns.huber_threshold(t, "exponential", 0.1)
    torch.testing.assert_close(exp, torch.tensor([1.0, 0.1 ** 0.5, 0.1 ** 0.999]))
    assert torch.equal(ns.huber_threshold(t, "constant", 0.2), torch.full((3,), 0.2))
    d = torch.tensor([1e-2, 10.0]).reshape(2, 1, 1, 1)
    zero = torch.zeros_like(d)
    huber = elementwise_loss(d, zero, "huber", torch.tensor([0.1, 0.1])).flatten()
    torch.testing.assert_close(huber[0], d.flatten()[0] ** 2, rtol=1e-2, atol=0)  # quadratic near 0
    assert abs(float(huber[1]) - 2 * 0.1 * (10.0 - 0.1)) < 1e-3  # linear far away
    smooth = elementwise_loss(d, zero, "smooth_l1", torch.tensor([0.1, 0.1])).flatten()
    torch.testing.assert_close(smooth, huber / 0.1)
    assert torch.equal(elementwise_loss(d, zero, "l1", None).flatten(), d.flatten())
    snr = ns.snr(t)
    torch.testing.assert_close(ns.loss_weight(t, None, False, debiased=True), 1 / snr.clamp(max=1000).sqrt())
    torch.testing.assert_close(ns.loss_weight(t, 5.0, True, debiased=True),
                               snr.clamp(max=5) / (snr + 1) / (snr.clamp(max=1000) + 1))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = pyramid_noise(noise, torch.Generator().manual_seed(1), 6, 0.3)
    b = pyramid_noise(noise, torch.Generator().manual_seed(1), 6, 0.3)
    assert torch.equal(a, b) and abs(float(a.std()) - 1.0) < 1e-5 and not torch.equal(a, noise)


def test_caption_prefix_suffix_and_the_extra_options_train(data):
    import random
    cfg = TrainConfig(caption_prefix="sks style,", caption_suffix=", masterpiece", shuffle_caption=True, keep_tokens=1)
    seen = {process_caption("cat, a, b", cfg, random.Random(n), 1) for n in range(10)}
    assert all(s.startswith("sks style, ") and "masterpiece" in s and "cat" in s for s in seen) and len(seen) > 1
    model = models.sd_model("sd1", seed=0)
    cfg = config(data, output_dir=str(data / "extras"), max_train_steps=3, learning_rate=1e-2, save_state=False,
                 caption_prefix="sks", loss_type="huber", huber_schedule="snr", multires_noise_iterations=6,
                 multires_noise_discount=0.3, ip_noise_gamma=0.1, debiased_estimation_loss=True, zero_terminal_snr=True,
                 v_parameterization=True, min_snr_gamma=5.0, noise_offset=0.05)
    result = Trainer(cfg, make_bundle(model), log_fn=lambda m: None).run()
    assert all(torch.isfinite(torch.tensor(x)) for _, x in result.losses)
    md = lib_lora.load(result.output).metadata
    assert (md["ss_loss_type"], md["ss_huber_schedule"], md["ss_huber_c"], md["ss_multires_noise_iterations"],
            md["ss_multires_noise_discount"], md["ss_ip_noise_gamma"], md["ss_debiased_estimation"],
            md["ss_zero_terminal_snr"]) == ("huber", "snr", "0.1", "6", "0.3", "0.1", "True", "True")
    with pytest.raises(LoraError, match="option loss_type must be one of l2, l1, huber, smooth_l1"):
        TrainConfig(loss_type="mse")
    with pytest.raises(LoraError, match="option max_token_length must be 75, 150 or 225"):
        TrainConfig(max_token_length=100)


def test_random_crop_and_colour_shift_draw_views_and_need_no_cache(data, base):
    with pytest.raises(LoraError, match="random_crop needs cache_latents and cache_latents_to_disk off"):
        config(data, random_crop=True)
    with pytest.raises(LoraError, match="color_aug needs cache_latents"):
        config(data, color_aug=True, cache_latents=False, cache_latents_to_disk=True)
    cfg = config(data, random_crop=True, color_aug=True, cache_latents=False, max_train_steps=2, learning_rate=1e-2,
                 output_dir=str(data / "crop"), save_state=False)
    ds = Dataset(cfg, 1)
    tall = [i for i in ds.train_items() if i.resized[1] > i.bucket[1]]
    assert tall, "the 64x96 images are taller than their bucket"
    crops = {ds.batch_choices([tall[0]], 1, 1, n)[1][0].crop for n in range(12)}
    limit = tall[0].resized[1] - tall[0].bucket[1]
    assert len(crops) > 2 and all(left == 0 and 0 <= top <= limit for left, top in crops)
    cache = LatentCache(vae_encode, "v", memory=False)
    top = sorted(crops)[-1]
    from lib_lora.train.cache import load_image
    pixels = load_image(tall[0], View(crop=top))
    assert pixels.shape[1:] == (tall[0].bucket[1], tall[0].bucket[0])
    torch.testing.assert_close(cache.get([tall[0]], [View(crop=top)])[0], vae_encode(pixels[None])[0])
    hues = [ds.batch_choices([tall[0]], 1, 1, n)[1][0].hue for n in range(12)]
    assert len(set(hues)) == 12 and all(abs(h) <= 8 / 180 for h in hues)
    shifted = load_image(tall[0], View(crop=top, hue=0.04))
    assert 0 < (shifted - pixels).abs().max() and abs(float(shifted.mean() - pixels.mean())) < 0.1
    result = Trainer(cfg, make_bundle(copy.deepcopy(base)), log_fn=lambda m: None).run()
    md = lib_lora.load(result.output).metadata
    assert result.step == 2 and md["ss_random_crop"] == "True" and md["ss_color_aug"] == "True"
