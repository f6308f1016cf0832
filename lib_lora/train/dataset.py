"""kohya-style datasets: image folders ``10_name`` (10 repeats) or kohya's dataset TOML, captions beside images or
in a fine-tuning metadata JSON, aspect-ratio buckets per dataset.

Every random choice (batch order, flips, crops, caption shuffling and dropout) is drawn from a generator seeded by
(seed, epoch, batch), never from a running global state, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from .. import toml_reader
from ..errors import LoraError
from .config import TrainConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KOHYA_EXTENSIONS = IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)  # kohya's glob: lower or upper case
_RE_FOLDER = re.compile(r"^(\d+)_(.*)$")
INFO_CACHE = "metadata_cache.json"  # kohya's cache_info file

# Options a subset of kohya's dataset TOML sets for itself (falling back to its dataset, [general], then the run).
SUBSET_OPTIONS = ("shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator", "secondary_separator",
                  "enable_wildcard", "color_aug", "flip_aug", "random_crop", "caption_prefix", "caption_suffix",
                  "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                  "token_warmup_min", "token_warmup_step", "resize_interpolation", "caption_extension", "cache_info")
# Options of a whole dataset.
DATASET_OPTIONS = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                   "bucket_reso_steps", "bucket_no_upscale", "validation_split", "validation_seed")
# kohya's keys of a subset alone, and keys it documents that this trainer takes but does not act on.
SUBSET_ONLY = ("image_dir", "num_repeats", "class_tokens", "is_reg", "metadata_file")
NOT_APPLIED = {"face_crop_aug_range": "face-centred crops are not done here",
               "alpha_mask": "the loss is not masked here",
               "custom_attributes": "no per-subset attributes are used here",
               "network_multiplier": "every dataset trains at multiplier 1 here",
               "conditioning_data_dir": "ControlNet datasets are not trained here"}


@dataclass
class ImageItem:
    path: str
    caption: str
    folder: str
    is_reg: bool
    size: tuple[int, int]
    bucket: tuple[int, int] = (0, 0)
    resized: tuple[int, int] = (0, 0)
    repeats: int = 1
    group: int = 0  # the dataset it belongs to
    subset: Subset | None = field(default=None, compare=False, repr=False)

    @property
    def interpolation(self) -> str | None:
        return self.subset.resize_interpolation if self.subset is not None else None


@dataclass(frozen=True)
class View:
    """How an image becomes a step's pixels: flipped, cropped at (left, top) (None: the centre), and its hue
    turned by a fraction of the colour circle."""

    flip: bool = False
    crop: tuple[int, int] | None = None
    hue: float = 0.0


HUE_SHIFT = 8 / 180  # kohya's color_aug: hue ±8 on OpenCV's 0..180 hue scale


@dataclass
class Subset:
    """One image folder or fine-tuning metadata file (kohya's ``[[datasets.subsets]]``) with its own caption and
    augmentation options."""

    image_dir: str
    num_repeats: int = 1
    class_tokens: str | None = None
    is_reg: bool = False
    metadata_file: str | None = None
    caption_extension: str = ".txt"
    cache_info: bool = False
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    resize_interpolation: str | None = None
    items: list[ImageItem] = field(default_factory=list, repr=False)

    @property
    def path(self) -> str:
        return self.metadata_file or self.image_dir

    @property
    def repeats(self) -> int:
        return self.num_repeats

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class DatasetSpec:
    """kohya's ``[[datasets]]``: subsets sharing a resolution, batch size and buckets."""

    subsets: list[Subset]
    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    validation_split: float = 0.0
    validation_seed: int | None = None
    buckets: Buckets | None = field(default=None, repr=False)
    mean_ar_error: float = 0.0

    @property
    def is_dreambooth(self) -> bool:
        return not any(s.metadata_file for s in self.subsets)


def subset_options(source) -> dict:
    """The subset options of a TrainConfig (or any object holding them)."""
    return {name: getattr(source, name) for name in SUBSET_OPTIONS}


# ---- buckets -------------------------------------------------------------------------------------
def bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """kohya's ``make_bucket_resolutions``: every (w, h) of at most the resolution's area, sides in [min, max]."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


class Buckets:
    """Which bucket an image goes to and the size it is resized to before the centre crop (kohya's BucketManager)."""

    def __init__(self, resolution: tuple[int, int], min_size: int, max_size: int, step: int,
                 no_upscale: bool = False, enabled: bool = True):
        self.step = step
        self.no_upscale = no_upscale and enabled
        self.max_area = resolution[0] * resolution[1]
        self.resos = bucket_resolutions(resolution, min_size, max_size, step) if enabled else [resolution]
        self.ratios = [w / h for w, h in self.resos]

    def round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def assign(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int], float]:
        """(bucket, resized size, aspect-ratio error) of one image."""
        ar = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self.resos:  # an image of exactly a bucket's size keeps it
                reso = self.resos[min(range(len(self.ratios)), key=lambda j: abs(self.ratios[j] - ar))]
            scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            return reso, resized, reso[0] / reso[1] - ar
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * ar)
            rh = self.max_area / rw
            bw = self.round(rw)
            ar_w = bw / self.round(bw / ar)
            bh = self.round(rh)
            ar_h = self.round(bh * ar) / bh
            resized = (bw, int(bw / ar + 0.5)) if abs(ar_w - ar) < abs(ar_h - ar) else (int(bh * ar + 0.5), bh)
        else:
            resized = (width, height)
        reso = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        if min(reso) < self.step:
            raise ValueError(f"smaller than {self.step} px on one side after resizing")
        return reso, resized, reso[0] / reso[1] - ar


# ---- kohya's dataset TOML --------------------------------------------------------------------------
def _source_error(source: str, reason: str) -> LoraError:
    return LoraError(source, reason, "see kohya's docs/config_README-en.md for the keys of a dataset config")


def read_dataset_config(path: str, cfg: TrainConfig, notes: list[str]) -> list[DatasetSpec]:
    """kohya's dataset TOML (or JSON) as datasets: each value from the subset, else its dataset, else
    ``[general]``, else the run's options (kohya's fallback order); unknown keys are refused as kohya does."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f) if path.lower().endswith(".json") else toml_reader.load(f)
    except OSError as e:
        raise LoraError(path, f"cannot read the dataset config ({e.strerror or e})", "check dataset_config") from None
    except (ValueError, toml_reader.TOMLDecodeError) as e:
        raise _source_error(path, f"not a valid dataset config: {e}") from None
    extra = set(doc) - {"general", "datasets"}
    if extra:
        raise _source_error(path, f"unknown top-level keys {sorted(extra)}")
    general = doc.get("general", {})
    run = dict(vars_of(cfg), batch_size=cfg.train_batch_size, num_repeats=cfg.dataset_repeats)
    allowed_general = set(SUBSET_OPTIONS) | set(DATASET_OPTIONS) | {"class_tokens"} | set(NOT_APPLIED)
    _check_keys(path, "[general]", general, allowed_general)
    datasets = []
    for n, ds in enumerate(doc.get("datasets", [])):
        where = f"[[datasets]] #{n + 1}"
        _check_keys(path, where, ds, allowed_general | {"subsets"})
        subsets = []
        for m, sub in enumerate(ds.get("subsets", [])):
            _check_keys(path, f"{where} subset #{m + 1}", sub, allowed_general | set(SUBSET_ONLY))
            layers = [sub, ds, general, run]
            values = {name: _first(layers, name) for name in SUBSET_OPTIONS}
            values.update(num_repeats=int(_first(layers, "num_repeats")), class_tokens=_first([sub, ds, general], "class_tokens"),
                          is_reg=bool(sub.get("is_reg", False)), metadata_file=sub.get("metadata_file"))
            if not sub.get("image_dir") and not values["metadata_file"]:
                raise _source_error(path, f"{where} subset #{m + 1} has no image_dir")
            for key in NOT_APPLIED:
                if _first([sub, ds, general], key) not in (None, False, 1.0):
                    notes.append(f"{path}: {key} is not applied: {NOT_APPLIED[key]}")
            subsets.append(_typed_subset(path, sub.get("image_dir", ""), values))
        layers = [ds, general, run]
        reso = _first(layers, "resolution")
        spec = DatasetSpec(subsets, _resolution(path, reso), int(_first(layers, "batch_size")),
                           bool(_first(layers, "enable_bucket")), int(_first(layers, "min_bucket_reso")),
                           int(_first(layers, "max_bucket_reso")), int(_first(layers, "bucket_reso_steps")),
                           bool(_first(layers, "bucket_no_upscale")), float(_first(layers, "validation_split") or 0),
                           _first(layers, "validation_seed"))
        if len({bool(s.metadata_file) for s in subsets}) > 1:
            raise _source_error(path, f"{where} mixes DreamBooth subsets and fine-tuning subsets (metadata_file)")
        datasets.append(spec)
    if not datasets:
        raise _source_error(path, "has no [[datasets]]")
    return datasets


def vars_of(cfg: TrainConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _first(layers: list[dict], name: str):
    """The first value that is set, subset to run (kohya's ``search_value``: None means not set)."""
    return next((layer[name] for layer in layers if layer.get(name) is not None), None)


def _check_keys(path: str, where: str, table: dict, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _source_error(path, f"{where}: unknown keys {unknown}")


def _resolution(path: str, value) -> tuple[int, int]:
    try:
        parts = [int(v) for v in (value if isinstance(value, (list, tuple)) else str(value).replace("x", ",").split(","))]
    except (TypeError, ValueError):
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 64:
        raise _source_error(path, f"resolution {value!r} is not N or [W, H] with sides of at least 64")
    return parts[0], parts[-1]


def _typed_subset(path: str, image_dir: str, values: dict) -> Subset:
    types = {f.name: f.type for f in dataclasses.fields(Subset)}
    out = {}
    for name, value in values.items():
        kind = types[name]
        try:
            if value is None or kind.startswith(("str", "list")):
                out[name] = value
            elif kind == "bool":
                out[name] = bool(value)
            elif kind == "int":
                out[name] = int(value)
            else:
                out[name] = float(value)
        except (TypeError, ValueError):
            raise _source_error(path, f"{name} = {value!r} is not a {kind}") from None
    if out["caption_extension"] and not out["caption_extension"].startswith("."):
        out["caption_extension"] = "." + out["caption_extension"]  # as kohya adds it
    return Subset(image_dir=image_dir, **out)


# ---- subsets from folders ------------------------------------------------------------------------------
def folder_subsets(root: str, cfg: TrainConfig, is_reg: bool, warnings: list[str]) -> list[Subset]:
    """The ``<repeats>_<class words>`` folders under ``root`` as subsets; problems go to ``warnings``."""
    what = "regularisation folder" if is_reg else "training folder"
    if not os.path.isdir(root):
        raise LoraError(root, f"{what} does not exist", "check train_data_dir / reg_data_dir")
    subsets = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not os.path.isdir(path) or entry.startswith("."):
            continue
        m = _RE_FOLDER.match(entry)
        if not m:
            warnings.append(f"{path}: skipped, the folder name is not '<repeats>_<class words>' (e.g. 10_cat)")
            continue
        if int(m[1]) < 1:
            warnings.append(f"{path}: skipped, 0 repeats")
            continue
        subsets.append(Subset(path, int(m[1]), m[2].replace("_", " ").strip(), is_reg, **subset_options(cfg)))
    return subsets


def load_subset(subset: Subset, group: int, warnings: list[str]) -> None:
    """Fill ``subset.items`` from its folder (captions beside the images) or its fine-tuning metadata file."""
    if subset.metadata_file:
        _load_metadata_file(subset, group, warnings)
        return
    if not os.path.isdir(subset.image_dir):
        warnings.append(f"{subset.image_dir}: skipped, not a folder")
        return
    cache = os.path.join(subset.image_dir, INFO_CACHE)
    cached = _read_info_cache(cache, warnings) if subset.cache_info else None
    names = sorted(n for n in os.listdir(subset.image_dir) if n.endswith(KOHYA_EXTENSIONS))
    missing = 0
    for name in names:
        file = os.path.join(subset.image_dir, name)
        if not os.path.isfile(file):
            continue
        info = (cached or {}).get(file)
        size = tuple(info["resolution"]) if info else _image_size(file, warnings)
        if size is None:
            continue
        caption = info["caption"] if info else _read_caption(file, subset, warnings)
        if not caption:
            missing += 1
            caption = subset.class_tokens or ""
        subset.items.append(ImageItem(file, caption, subset.name, subset.is_reg, size, repeats=subset.num_repeats,
                                      group=group, subset=subset))
    if not subset.items:
        warnings.append(f"{subset.image_dir}: skipped, no readable images ({', '.join(IMAGE_EXTENSIONS)})")
        return
    if missing:
        fallback = f"the class words {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
        warnings.append(f"{subset.image_dir}: {missing} of {len(subset.items)} images have no "
                        f"{subset.caption_extension} caption; they use {fallback}")
    if subset.cache_info and cached is None:
        from ..sidecar import atomic_write_bytes
        atomic_write_bytes(cache, json.dumps({i.path: {"caption": i.caption, "resolution": list(i.size)}
                                              for i in subset.items}, ensure_ascii=False, indent=2).encode())


def _read_info_cache(path: str, warnings: list[str]) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: unreadable ({e.__class__.__name__}); the folder is read again")
        return None


def _load_metadata_file(subset: Subset, group: int, warnings: list[str]) -> None:
    """kohya's fine-tuning subset: {image: {"caption": ..., "tags": ...}} (JSON, or JSON lines with image_path)."""
    path = subset.metadata_file
    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".jsonl"):
                meta = {}
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        meta[row["image_path"]] = row
            else:
                meta = json.load(f)
    except (OSError, ValueError, KeyError) as e:
        raise LoraError(path, f"unreadable fine-tuning metadata ({e.__class__.__name__}: {e})",
                        "give a JSON file of {image: {caption, tags}}") from None
    for key, md in meta.items():
        file = key if os.path.isabs(key) else os.path.join(subset.image_dir or "", key)
        if not os.path.isfile(file):
            file = next((file + e for e in KOHYA_EXTENSIONS if os.path.isfile(file + e)), file)
        size = _image_size(file, warnings)
        if size is None:
            continue
        caption, tags = md.get("caption") or "", md.get("tags")
        if tags:
            if subset.enable_wildcard:
                tags = tags.replace("\n", subset.caption_separator)
                caption = "\n".join(f"{line}{subset.caption_separator}{tags}" for line in caption.split("\n") if line.strip())
            else:
                caption = caption + subset.caption_separator + tags if caption else tags
        subset.items.append(ImageItem(file, caption, subset.name, False, size, repeats=subset.num_repeats, group=group,
                                      subset=subset))
    if not subset.items:
        warnings.append(f"{path}: skipped, no readable images")


def _image_size(path: str, warnings: list[str]) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as e:  # PIL raises many kinds for broken files; every one means "cannot use this image"
        warnings.append(f"{path}: skipped, unreadable image ({e.__class__.__name__}: {str(e)[:120]})")
        return None
    if min(size) < 8:
        warnings.append(f"{path}: skipped, only {size[0]}x{size[1]} pixels")
        return None
    return size


def caption_file(image: str, extension: str) -> str | None:
    """The caption beside an image: ``img.txt``, or, for kohya's face-crop names ``img_<4 numbers>.png``,
    ``img.txt``."""
    base = os.path.splitext(image)[0]
    tokens = base.split("_")
    for candidate in (base, "_".join(tokens[:-4]) if len(tokens) >= 5 else None):
        if candidate and os.path.isfile(candidate + extension):
            return candidate + extension
    return None


def _read_caption(image: str, subset: Subset, warnings: list[str]) -> str | None:
    """The caption text: its lines joined by spaces, or kept apart for wildcards (one random line per step)."""
    path = caption_file(image, subset.caption_extension)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [" ".join(line.split()) for line in f]
    except (OSError, UnicodeDecodeError) as e:
        warnings.append(f"{path}: caption unreadable ({e.__class__.__name__}); the folder's class words are used")
        return None
    lines = [line for line in lines if line]
    return ("\n" if subset.enable_wildcard else " ").join(lines) or None


# ---- the dataset ---------------------------------------------------------------------------------
class Dataset:
    """Training items (with repeats), held-out validation items and regularisation items of one or more datasets
    (kohya's dataset TOML, train_data_dir folders or in_json), each bucketed at its own resolution."""

    def __init__(self, cfg: TrainConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.datasets = self._specs()
        for group, spec in enumerate(self.datasets):
            unique = []
            for s in spec.subsets:
                if any(s.path == u.path for u in unique):
                    self.warnings.append(f"{s.path}: skipped, already a subset of this dataset (kohya uses the first)")
                    continue
                load_subset(s, group, self.warnings)
                unique.append(s)
            spec.subsets = [s for s in unique if s.items]
        self.subsets = [s for d in self.datasets for s in d.subsets if not s.is_reg]
        self.reg_subsets = [s for d in self.datasets for s in d.subsets if s.is_reg]
        if not self.subsets:
            where = cfg.dataset_config or cfg.train_data_dir
            raise LoraError(where, "no usable training images",
                            "put images in subfolders named '<repeats>_<class words>', e.g. 10_cat, with captions "
                            "in .txt files beside them")
        self.reg_images_found = sum(len(s.items) * s.num_repeats for s in self.reg_subsets)
        self.validation = self._split_validation()
        for spec in self.datasets:
            self._bucket(spec)
        for s in self.subsets + self.reg_subsets:
            s.items = [i for i in s.items if i.repeats]
        self.validation = [i for i in self.validation if i.repeats]
        if not self.train_items():
            raise LoraError(cfg.dataset_config or cfg.train_data_dir, "no usable training images left",
                            "see the warnings above")
        for group in range(len(self.datasets)):
            self._balance_reg(group)

    def _specs(self) -> list[DatasetSpec]:
        cfg = self.cfg
        if cfg.dataset_config:
            if cfg.train_data_dir or cfg.reg_data_dir or cfg.in_json:
                self.notes.append("train_data_dir, reg_data_dir and in_json are not used: dataset_config gives the data")
            return read_dataset_config(cfg.dataset_config, cfg, self.notes)
        if cfg.in_json:
            subsets = [Subset(cfg.train_data_dir, cfg.dataset_repeats, metadata_file=cfg.in_json, **subset_options(cfg))]
        else:
            subsets = folder_subsets(cfg.train_data_dir, cfg, False, self.warnings)
            if not subsets:
                raise LoraError(cfg.train_data_dir, "no usable training images",
                                "put images in subfolders named '<repeats>_<class words>', e.g. 10_cat, with "
                                "captions in .txt files beside them")
            if cfg.reg_data_dir:
                subsets += folder_subsets(cfg.reg_data_dir, cfg, True, self.warnings)
        return [DatasetSpec(subsets, cfg.resolution_wh(), cfg.train_batch_size, cfg.enable_bucket, cfg.min_bucket_reso,
                            cfg.max_bucket_reso, cfg.bucket_reso_steps, cfg.bucket_no_upscale, cfg.validation_split,
                            cfg.validation_seed)]

    def _bucket(self, spec: DatasetSpec) -> None:
        spec.buckets = Buckets(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps,
                               spec.bucket_no_upscale, spec.enable_bucket)
        errors = []
        group = self.datasets.index(spec)
        held = [i for i in self.validation if i.group == group]
        for item in [i for s in spec.subsets for i in s.items] + held:
            try:
                item.bucket, item.resized, err = spec.buckets.assign(*item.size)
            except ValueError as e:
                self.warnings.append(f"{item.path}: skipped, {e}")
                item.repeats = 0
                continue
            errors.append(abs(err))
        errors = errors[:len(errors) - len(held)] if held else errors  # kohya: training images only
        spec.mean_ar_error = sum(errors) / len(errors) if errors else 0.0

    def _split_validation(self) -> list[ImageItem]:
        """Take each dataset's ``validation_split`` of each training subset out of training (at least one image,
        never all)."""
        held = []
        for spec in self.datasets:
            if not spec.validation_split:
                continue
            seed = spec.validation_seed if spec.validation_seed is not None else self.seed
            rng = random.Random(f"validation:{seed}")
            for s in spec.subsets:
                if s.is_reg:
                    continue
                n = min(len(s.items) - 1, max(1, round(len(s.items) * spec.validation_split)))
                if n < 1:
                    self.warnings.append(f"{s.path}: only one image, none held out for validation")
                    continue
                chosen = set(rng.sample(range(len(s.items)), n))
                held += [i for k, i in enumerate(s.items) if k in chosen]
                s.items = [i for k, i in enumerate(s.items) if k not in chosen]
        return held

    def _balance_reg(self, group: int) -> None:
        """kohya: a dataset's regularisation images repeat (or are cut) until they number as many as its training
        images."""
        reg = [s for s in self.datasets[group].subsets if s.is_reg]
        if not reg:
            return
        target = sum(i.repeats for s in self.datasets[group].subsets if not s.is_reg for i in s.items)
        for s in reg:
            for item in s.items:
                item.repeats = 0
        n, first = 0, True
        while n < target:
            for s in reg:
                for item in s.items:
                    add = s.num_repeats if first else 1
                    item.repeats += add
                    n += add
                    if n >= target:
                        return
            first = False

    def all_items(self) -> list[ImageItem]:
        return [i for s in self.subsets + self.reg_subsets for i in s.items] + self.validation

    def train_items(self) -> list[ImageItem]:
        return [i for s in self.subsets for i in s.items]

    def reg_items(self) -> list[ImageItem]:
        return [i for s in self.reg_subsets for i in s.items if i.repeats]

    @property
    def num_train_images(self) -> int:
        """Images times repeats, as kohya counts them."""
        return sum(i.repeats for i in self.train_items())

    @property
    def num_reg_images(self) -> int:
        return sum(i.repeats for i in self.reg_items())

    # ---- epochs --------------------------------------------------------------------------------
    def _epoch_pool(self) -> dict[tuple[int, tuple[int, int]], list[ImageItem]]:
        pool: dict[tuple[int, tuple[int, int]], list[ImageItem]] = {}
        for item in self.train_items() + self.reg_items():
            pool.setdefault((item.group, item.bucket), []).extend([item] * item.repeats)
        return dict(sorted(pool.items()))

    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(v) / self.datasets[g].batch_size) for (g, _), v in self._epoch_pool().items())

    def epoch_batches(self, seed: int, epoch: int) -> list[list[ImageItem]]:
        """One epoch's batches (each from one bucket of one dataset, of that dataset's batch size), shuffled by
        (seed, epoch) only."""
        rng = random.Random(f"epoch:{seed}:{epoch}")
        batches = []
        for (group, _), items in self._epoch_pool().items():
            b = self.datasets[group].batch_size
            items = items[:]
            rng.shuffle(items)
            batches += [items[k:k + b] for k in range(0, len(items), b)]
        rng.shuffle(batches)
        return batches

    def batch_choices(self, batch: list[ImageItem], seed: int, epoch: int, index: int, step: int = 0,
                      total_steps: int = 0) -> tuple[list[str], list[View]]:
        """Captions (shuffled/dropped) and views (flip, crop, hue) for one batch, drawn from (seed, epoch, batch
        index), each with its subset's options."""
        rng = random.Random(f"batch:{seed}:{epoch}:{index}")
        options = [i.subset or self.cfg for i in batch]
        captions = [process_caption(i.caption, o, rng, epoch, step, total_steps) for i, o in zip(batch, options)]
        flips = [o.flip_aug and rng.random() < 0.5 for o in options]
        crops = [(rng.randint(0, i.resized[0] - i.bucket[0]), rng.randint(0, i.resized[1] - i.bucket[1]))
                 if o.random_crop else None for i, o in zip(batch, options)]
        hues = [rng.uniform(-HUE_SHIFT, HUE_SHIFT) if o.color_aug else 0.0 for o in options]
        return captions, [View(f, c, h) for f, c, h in zip(flips, crops, hues)]

    # ---- metadata ------------------------------------------------------------------------------
    def tag_frequency(self, group: int | None = None) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how many captions hold each (lower-cased) tag; for a
        fine-tuning subset its metadata file's tags."""
        out: dict[str, dict[str, int]] = {}
        for g, spec in enumerate(self.datasets):
            if group is not None and g != group:
                continue
            for s in spec.subsets:
                if s.name in out:
                    continue
                freq = out.setdefault(s.name, {})
                for item in s.items:
                    for tag in item.caption.split(","):
                        tag = tag.strip().lower()
                        if tag:
                            freq[tag] = freq.get(tag, 0) + 1
        return out

    def dirs_info(self, reg: bool) -> dict[str, dict[str, int]]:
        subsets = self.reg_subsets if reg else self.subsets
        return {s.name: {"n_repeats": s.num_repeats, "img_count": len(s.items)} for s in subsets}

    def bucket_info(self, group: int = 0) -> dict | None:
        """kohya's per-dataset ``bucket_info`` (None without buckets, as kohya writes it)."""
        spec = self.datasets[group]
        if not spec.enable_bucket:
            return None
        counts = Counter()
        for item in self.train_items() + self.reg_items():
            if item.group == group:
                counts[item.bucket] += item.repeats
        buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
        return {"buckets": buckets, "mean_img_ar_error": spec.mean_ar_error}


def with_affixes(caption: str, opts) -> str:
    """The caption with ``caption_prefix`` / ``caption_suffix``, joined by a space as kohya does."""
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix
    return caption


_WILDCARD = re.compile(r"\{([^}]+)\}")


def process_caption(caption: str, opts, rng: random.Random, epoch: int, step: int = 0, total_steps: int = 0) -> str:
    """kohya's ``process_caption`` with its subset options (a Subset or a TrainConfig): prefix/suffix, whole-
    caption dropout, wildcards ({a|b}, one random line), then, with shuffling, tag dropout or token warm-up,
    the fixed parts (keep_tokens or keep_tokens_separator) kept and the rest shuffled, cut and dropped, and the
    secondary separator turned into the separator."""
    caption = with_affixes(caption, opts)
    every = opts.caption_dropout_every_n_epochs
    dropped = rng.random() < opts.caption_dropout_rate if opts.caption_dropout_rate > 0 else False
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    if opts.enable_wildcard:
        lines = caption.split("\n")
        caption = rng.choice(lines) if len(lines) > 1 else caption
        caption = caption.replace("{{", "\0").replace("}}", "\1")
        caption = _WILDCARD.sub(lambda m: rng.choice(m[1].split("|")), caption).replace("\0", "{").replace("\1", "}")
    warmup = opts.token_warmup_step
    if warmup and warmup < 1:
        warmup = math.floor(warmup * total_steps)
    if opts.shuffle_caption or warmup > 0 or opts.caption_tag_dropout_rate > 0:
        sep = opts.caption_separator
        fixed, flex, suffix = [], [], []
        if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
            fixed_part, flex_part = caption.split(opts.keep_tokens_separator, 1)
            if opts.keep_tokens_separator in flex_part:
                flex_part, suffix_part = flex_part.split(opts.keep_tokens_separator, 1)
                suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tags = [t.strip() for t in caption.strip().split(sep)]
            fixed, flex = tags[:opts.keep_tokens], tags[opts.keep_tokens:]
        if warmup and step < warmup:
            flex = flex[:math.floor(step * (len(flex) - opts.token_warmup_min) / warmup) + opts.token_warmup_min]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption
