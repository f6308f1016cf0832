"""kohya sd-scripts' files and options: the dataset TOML against kohya's own config_util (a recorded fixture),
kohya / kohya_ss run TOMLs, every train_network.py option accepted, the export, the metadata kohya writes."""
from __future__ import annotations

import json
import os
import pathlib

import pytest
from PIL import Image, ImageDraw

from test_train import one_thread  # noqa: F401  (autouse: one intra-op thread for the tiny model)

FIXTURES = pathlib.Path(__file__).with_name("fixtures")

# (subfolder, file stem, size, caption or None) of the dataset kohya's config_util read for the fixture
KOHYA_IMAGES = [
    ("a", "a0", (64, 64), "cat, sitting, red"), ("a", "a1", (96, 64), "cat, lying"), ("a", "a2", (64, 128), None),
    ("a", "a3", (200, 150), "cat, big, photo"),
    ("b", "b0", (128, 128), "dog, running"), ("b", "b1", (80, 120), None), ("b", "b2", (150, 100), "dog, white"),
    ("reg", "r0", (64, 64), None), ("reg", "r1", (96, 96), "animal, field"), ("reg", "r2", (120, 64), None),
    ("reg", "r3", (64, 96), None), ("reg", "r4", (100, 100), "animal"),
]
KOHYA_CAPTION_FILES = {("a", "a1", ".caption"): "a cat on a sofa", ("a", "a3", ".caption"): "a large cat"}
KOHYA_TOML = """[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
enable_bucket = true
bucket_reso_steps = 64

[[datasets]]
resolution = 128
batch_size = 2
min_bucket_reso = 64
max_bucket_reso = 256

  [[datasets.subsets]]
  image_dir = '{root}/a'
  class_tokens = 'a cat'
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = '{root}/b'
  class_tokens = 'a dog'
  num_repeats = 2
  flip_aug = true

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'animal'
  num_repeats = 1

[[datasets]]
resolution = [128, 64]
batch_size = 1
enable_bucket = false

  [[datasets.subsets]]
  image_dir = '{root}/a'
  caption_extension = '.caption'
  class_tokens = 'cat photo'
  num_repeats = 1
"""


def write_kohya_dataset(root: pathlib.Path) -> pathlib.Path:
    """The images, captions and dataset TOML the fixture was made from (also run through kohya's code)."""
    for folder, stem, size, caption in KOHYA_IMAGES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", size, (230, 230, 230))
        ImageDraw.Draw(im).ellipse([4, 4, size[0] - 4, size[1] - 4], fill=(len(stem) * 40, 120, 200))
        im.save(root / folder / f"{stem}.png")
        if caption is not None:
            (root / folder / f"{stem}.txt").write_text(caption + "\n")
    for (folder, stem, ext), text in KOHYA_CAPTION_FILES.items():
        (root / folder / f"{stem}{ext}").write_text(text + "\n")
    toml = root / "dataset.toml"
    toml.write_text(KOHYA_TOML.format(root=root.as_posix()))
    return toml


# ---- the dataset TOML against kohya's own config_util --------------------------------------------------
def test_dataset_toml_gives_kohyas_images_repeats_captions_and_buckets(tmp_path):
    from lib_lora.train import TrainConfig
    from lib_lora.train.dataset import Dataset
    from lib_lora.train.metadata import datasets_metadata

    root = tmp_path / "data"
    toml = write_kohya_dataset(root)
    want = json.loads((FIXTURES / "kohya_dataset_config.json").read_text())["datasets"]
    data = Dataset(TrainConfig(dataset_config=str(toml)), seed=1)
    assert all("caption; they use the class words" in w for w in data.warnings) and len(data.datasets) == len(want) == 2
    for group, (spec, ref) in enumerate(zip(data.datasets, want)):
        items = sorted((i for s in spec.subsets for i in s.items if i.repeats), key=lambda i: i.path)
        got = [{"path": os.path.relpath(i.path, root), "caption": i.caption, "repeats": i.repeats, "is_reg": i.is_reg,
                "size": list(i.size), "bucket": list(i.bucket), "resized": list(i.resized)} for i in items]
        assert got == ref["images"], f"dataset {group}"
        assert (spec.batch_size, list(spec.resolution), spec.enable_bucket) == (
            ref["batch_size"], ref["resolution"], ref["enable_bucket"])
        assert sum(i.repeats for i in items if not i.is_reg) == ref["num_train_images"]
        assert data.tag_frequency(group) == ref["tag_frequency"]
        assert json.loads(json.dumps(data.bucket_info(group))) == ref["bucket_info"]
        assert [{"image_dir": os.path.relpath(s.image_dir, root), "img_count": len(s.items), "num_repeats": s.num_repeats,
                 "is_reg": s.is_reg, "class_tokens": s.class_tokens, "caption_extension": s.caption_extension,
                 "keep_tokens": s.keep_tokens, "shuffle_caption": s.shuffle_caption, "flip_aug": s.flip_aug}
                for s in spec.subsets] == ref["subsets"]
    assert data.batches_per_epoch() == sum(ref["batches"] for ref in want)
    assert data.reg_images_found == sum(ref["num_reg_images"] for ref in want)
    batches = data.epoch_batches(seed=1, epoch=1)
    assert sorted(len(b) for b in batches if b[0].group == 1) == [1] * 4
    assert all(len({(i.group, i.bucket) for i in b}) == 1 for b in batches)
    md = json.loads(datasets_metadata(data)["ss_datasets"])
    assert [d["num_reg_images"] for d in md] == [5, 0] and md[1]["bucket_info"] is None
    assert [s["image_dir"] for s in md[0]["subsets"]] == ["a", "b", "reg"] and md[0]["subsets"][2]["is_reg"]


# ---- run TOMLs and options -----------------------------------------------------------------------------
KOHYA_OPTIONS = json.loads((FIXTURES / "kohya_train_network_options.json").read_text())["options"]
# A run TOML as kohya_ss's lora_gui.py writes it for sd-scripts (config_toml_data: "", False and None dropped,
# keys sorted), LoRA type "Standard" on SD1.5.
KOHYA_SS_TOML = """bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
cache_latents_to_disk = true
caption_dropout_every_n_epochs = 0
caption_dropout_rate = 0.05
caption_extension = ".txt"
clip_skip = 2
dynamo_backend = "no"
enable_bucket = true
epoch = 10
gradient_accumulation_steps = 1
huber_c = 0.1
huber_scale = 1
huber_schedule = "snr"
keep_tokens = 1
learning_rate = 0.0001
logging_dir = "{root}/log"
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 10
lr_scheduler_power = 1
lr_warmup_steps = 0
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_epochs = 10
max_train_steps = 1600
min_bucket_reso = 256
mixed_precision = "fp16"
network_alpha = 8
network_args = {network_args}
network_dim = 16
network_module = "{network_module}"
noise_offset_type = "Original"
optimizer_args = ["weight_decay=0.01"]
optimizer_type = "AdamW8bit"
output_dir = "{root}/model"
output_name = "ink"
pretrained_model_name_or_path = "{root}/v1-5-pruned-emaonly.safetensors"
prior_loss_weight = 1
resolution = "512,512"
sample_prompts = "{root}/model/sample/prompt.txt"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
sdpa = true
seed = 1234
shuffle_caption = true
text_encoder_lr = [5e-05, 5e-05]
train_batch_size = 2
train_data_dir = "{root}/img"
unet_lr = 0.0001
wandb_run_name = "ink"
"""
LOCON_ARGS = ('["preset=full", "conv_dim=4", "conv_alpha=1", "use_tucker=False", "rank_dropout=0", "bypass_mode=False", '
              '"dora_wd=False", "module_dropout=0", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False", '
              '"algo=locon", "train_norm=False"]')


def test_every_train_network_option_is_accepted():
    import dataclasses

    from lib_lora.train import TrainConfig
    from lib_lora.train.config import from_args
    from lib_lora.train.kohya_options import NOT_HERE, kohya_names

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    names = {o["name"] for o in KOHYA_OPTIONS}
    assert len(names) == 193 and names <= fields | kohya_names(), sorted(names - fields - kohya_names())
    argv, noted = [], 0
    for name, (off, why) in NOT_HERE.items():
        flag = next(o for o in KOHYA_OPTIONS if o["name"] == name)["flag"] or off is False
        argv += [f"--{name}"] if flag else [f"--{name}", "7"]
        noted += why is not None
    cfg, ns = from_args(argv + ["--network_module", "networks.lora", "--network_args", "conv_dim=4", "--use_8bit_adam",
                                "--caption_extention", ".cap"])
    assert (cfg.optimizer_type, cfg.conv_dim, cfg.caption_extension) == ("AdamW8bit", 4, ".cap")
    assert len(ns.notes) == noted and all(" does nothing here: " in n for n in ns.notes)
    defaults = {o["name"]: o["default"] for o in KOHYA_OPTIONS if o["default"] not in (None, "") and o["name"] != "config_file"}
    notes: list[str] = []
    TrainConfig.from_dict(defaults, notes=notes)  # kohya's own defaults are all valid here
    assert notes == [f"max_data_loader_n_workers = 8 does nothing here: {NOT_HERE['max_data_loader_n_workers'][1]}"]


@pytest.mark.parametrize("module,args", [("networks.lora", "[]"), ("lycoris.kohya", LOCON_ARGS)])
def test_kohya_ss_run_toml_loads(tmp_path, module, args):
    from lib_lora.train.config import from_args, import_file

    toml = tmp_path / "config_lora-20250101-120000.toml"
    toml.write_text(KOHYA_SS_TOML.format(root=tmp_path.as_posix(), network_module=module, network_args=args))
    cfg, notes = import_file(str(toml))
    assert (cfg.network_dim, cfg.network_alpha, cfg.resolution_wh(), cfg.clip_skip, cfg.sdpa) == (16, 8.0, (512, 512), 2, True)
    assert (cfg.optimizer_type, cfg.text_encoder_lr, cfg.save_precision, cfg.max_train_epochs) == ("AdamW8bit", 5e-05, "fp16", 10)
    assert (cfg.max_timestep, cfg.logging_dir, cfg.sample_sampler, cfg.bucket_no_upscale) == (1000, f"{tmp_path.as_posix()}/log", "euler_a", True)
    assert (cfg.network_algo, cfg.conv_dim) == (("lora", 4) if module == "lycoris.kohya" else ("lora", None))
    assert sorted(n.split(" ")[0] for n in notes) == ["epoch", "max_data_loader_n_workers", "noise_offset_type",
                                                      "wandb_run_name"]
    via_cli, ns = from_args(["--config_file", str(toml), "--network_dim", "4"])
    assert via_cli.network_dim == 4 and via_cli.clip_skip == 2 and len(ns.notes) == len(notes)


def test_export_is_a_kohya_run_toml_that_reads_back(tmp_path):
    from lib_lora.train import TrainConfig
    from lib_lora.train.config import import_file, to_kohya_toml
    from lib_lora.train.__main__ import main as cli

    cfg = TrainConfig(train_data_dir=str(tmp_path / "img"), network_algo="lokr", network_dim=8, conv_dim=4, conv_alpha=1.0, lokr_factor=8,
                      resolution="768,512", optimizer_args=["weight_decay=0.1"], clip_skip=2, save_precision="fp32",
                      base_weights=["a.safetensors"], base_weights_multiplier=["0.5"], min_snr_gamma=5.0,
                      logging_dir="logs", enable_wildcard=True, text_encoder_lr=5e-5)
    text = to_kohya_toml(cfg)
    assert 'network_module = "lycoris.kohya"' in text and 'network_args = ["algo=lokr", "conv_dim=4", "conv_alpha=1.0", "factor=8"]' in text
    assert 'save_precision = "float"' in text and "base_weights_multiplier = [0.5]" in text and "model_factory" not in text
    path = tmp_path / "run.toml"
    path.write_text(text)
    back, notes = import_file(str(path))
    assert back == cfg and not notes
    dataset = tmp_path / "dataset.toml"
    dataset.write_text("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'x'\n")
    assert import_file(str(dataset))[0].dataset_config == str(dataset)
    out = tmp_path / "written.toml"
    assert cli(["--config_file", str(out), "--output_config", "--network_dim", "32", "--clip_skip", "2"]) == 0
    assert import_file(str(out))[0] == TrainConfig(network_dim=32, clip_skip=2)
    assert cli(["--config_file", str(out), "--output_config"]) == 2  # never over an existing file


# ---- captions, metadata, logs, saving: kohya's meanings on the tiny model -------------------------------
def test_caption_separators_wildcards_and_token_warmup():
    import random

    from lib_lora.train.dataset import Subset, process_caption

    s = Subset("x", shuffle_caption=True, keep_tokens_separator="|||", secondary_separator=";;;")
    caption = "1girl, miku ||| stage, mic, smile ||| best quality, general"
    seen = {process_caption(caption, s, random.Random(n), 1) for n in range(30)}
    assert len(seen) > 2 and all(c.startswith("1girl, miku, ") and c.endswith(", best quality, general") for c in seen)
    assert process_caption("a, sky;;;cloud, b", Subset("x", secondary_separator=";;;"), random.Random(0), 1) == "a, sky,cloud, b"
    wild = Subset("x", enable_wildcard=True)
    picks = {process_caption("a {red|blue} cat, {{retro}}\nline two", wild, random.Random(n), 1) for n in range(30)}
    assert picks == {"a red cat, {retro}", "a blue cat, {retro}", "line two"}
    warm = Subset("x", token_warmup_min=1, token_warmup_step=10)
    assert process_caption("a, b, c, d, e", warm, random.Random(0), 1, step=0) == "a"
    assert process_caption("a, b, c, d, e", warm, random.Random(0), 1, step=5) == "a, b, c"
    assert process_caption("a, b, c, d, e", Subset("x", token_warmup_step=0.5), random.Random(0), 1, step=5,
                           total_steps=20) == "a, b, c"


@pytest.fixture(scope="module")
def tiny():
    import models
    return models.sd_model("sd1", seed=0)


def run_tiny(tiny, tmp_path, **kw):
    import copy

    from lib_lora.train import Trainer
    from test_train import config, make_bundle, make_images

    make_images(str(tmp_path / "img" / "2_cat"))
    cfg = config(tmp_path, **kw)
    trainer = Trainer(cfg, make_bundle(copy.deepcopy(tiny)), log_fn=lambda m: None)
    return trainer, trainer.run()


def test_metadata_writes_none_where_kohya_does_and_the_minimum_without_metadata(tiny, tmp_path):
    import lib_lora
    from lib_lora.train.metadata import MINIMUM_KEYS

    trainer, result = run_tiny(tiny, tmp_path, max_train_steps=2, enable_bucket=False, clip_skip=2, save_state=False,
                               huber_scale=2.0, metadata_author="me", min_timestep=100, metadata_title="Ink")
    md = lib_lora.load(result.output).metadata
    want = {"ss_bucket_info": "null", "ss_min_bucket_reso": "None", "ss_max_bucket_reso": "None",
            "ss_enable_bucket": "False", "ss_validate_every_n_epochs": "None", "ss_resize_interpolation": "None",
            "ss_huber_scale": "2.0", "ss_clip_skip": "2", "ss_adaptive_noise_scale": "None",
            "modelspec.encoder_layer": "2", "modelspec.author": "me", "modelspec.title": "Ink",
            "modelspec.timestep_range": "100,1000", "modelspec.implementation": "diffusers"}
    assert {k: md.get(k) for k in want} == want
    assert md["modelspec.implementation_version"].startswith("sd-webui-lora/")
    _, bare = run_tiny(tiny, tmp_path / "bare", max_train_steps=1, no_metadata=True, save_state=False)
    keys = set(lib_lora.load(bare.output).metadata)
    assert {k for k in keys if k.startswith("ss_")} <= set(MINIMUM_KEYS) and "sshs_model_hash" in keys
    assert "modelspec.title" in keys


def test_logging_dir_writes_tensorboard_files_or_csv(tiny, tmp_path):
    from lib_lora.train.logs import tensorboard_writer

    has_tb = tensorboard_writer(str(tmp_path / "probe")) is not None
    trainer, result = run_tiny(tiny, tmp_path, max_train_steps=3, logging_dir=str(tmp_path / "logs"), log_prefix="ink-",
                               validation_split=0.25, validate_every_n_steps=2, save_state=False)
    runs = os.listdir(tmp_path / "logs")
    assert len(runs) == 1 and runs[0].startswith("ink-")
    folder = tmp_path / "logs" / runs[0] / "network_train"
    files = os.listdir(folder)
    if has_tb:
        assert any(f.startswith("events.out.tfevents") for f in files)
    else:
        import csv
        rows = list(csv.DictReader(open(folder / "scalars.csv")))
        tags = {r["tag"] for r in rows}
        assert {"loss/current", "loss/average", "lr/textencoder", "lr/unet", "loss/validation/step_current"} <= tags
        assert [float(r["value"]) for r in rows if r["tag"] == "loss/current"] == [x for _, x in result.losses]


def test_save_last_n_epochs_keeps_only_the_last_files(tiny, tmp_path):
    trainer, result = run_tiny(tiny, tmp_path, max_train_epochs=4, train_batch_size=4, save_every_n_epochs=1,
                               save_last_n_epochs=2, save_last_n_epochs_state=1, output_name="ink")
    files = sorted(os.listdir(tmp_path / "out"))
    assert [f for f in files if f.endswith(".safetensors")] == ["ink-000002.safetensors", "ink-000003.safetensors",
                                                                "ink.safetensors"]
    assert [f for f in files if f.endswith("-state")] == ["ink-000003-state", "ink-state"]


def test_kohya_noise_and_loss_options_train_and_max_norm_holds(tiny, tmp_path):
    import torch

    trainer, result = run_tiny(tiny, tmp_path, max_train_steps=3, learning_rate=0.5, min_timestep=200, max_timestep=800,
                               noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05,
                               ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, v_parameterization=True,
                               scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.1, loss_type="huber",
                               huber_schedule="constant", huber_scale=0.5, scale_weight_norms=0.05, save_state=False)
    assert all(torch.isfinite(torch.tensor(x)) for _, x in result.losses)
    for m in trainer.network.loras.values():
        delta = (m.lora_up.weight.detach().flatten(1) @ m.lora_down.weight.detach().flatten(1)) * m.scale
        assert float(delta.norm()) <= 0.05 * 1.0001


def test_in_json_fine_tuning_metadata_gives_captions_and_tags(tmp_path):
    from lib_lora.train import TrainConfig
    from lib_lora.train.dataset import Dataset

    folder = tmp_path / "ft"
    folder.mkdir()
    for n in range(2):
        Image.new("RGB", (64, 64), (n * 90, 40, 40)).save(folder / f"i{n}.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"i0.png": {"caption": "a photo", "tags": "cat, red"}, "i1": {"tags": "dog"}}))
    data = Dataset(TrainConfig(train_data_dir=str(folder), in_json=str(meta), dataset_repeats=3, resolution="64",
                               min_bucket_reso=64))
    assert sorted((os.path.basename(i.path), i.caption, i.repeats) for i in data.train_items()) == [
        ("i0.png", "a photo,cat, red", 3), ("i1.png", "dog", 3)]
    assert data.dirs_info(reg=False) == {"meta.json": {"n_repeats": 3, "img_count": 2}}


def test_resize_interpolation_picks_the_filter_and_keys_the_cache(tmp_path):
    import torch

    from lib_lora.train.cache import LatentCache, load_image
    from lib_lora.train.dataset import ImageItem, Subset, View

    path = tmp_path / "i.png"
    im = Image.new("RGB", (48, 48))
    ImageDraw.Draw(im).rectangle([10, 10, 30, 40], fill=(255, 0, 0))
    im.save(path)
    items = {name: ImageItem(str(path), "", "x", False, (48, 48), (64, 64), (64, 64), subset=Subset("x", resize_interpolation=name))
             for name in (None, "nearest")}
    lanczos, nearest = (load_image(i) for i in items.values())
    assert not torch.equal(lanczos, nearest) and set(nearest.unique().tolist()) <= {-1.0, 1.0}
    cache = LatentCache(lambda x: x, "v", memory=True)
    assert cache.key(items[None], View()) != cache.key(items["nearest"], View())
