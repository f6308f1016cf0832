"""kohya-style image folders: ``10_name`` = 10 repeats, captions beside images, aspect-ratio buckets.

Every random choice (batch order, flips, caption shuffling and dropout) is drawn from a generator seeded by
(seed, epoch, batch), never from a running global state, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from ..errors import LoraError
from .config import TrainConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_RE_FOLDER = re.compile(r"^(\d+)_(.*)$")


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
    path: str
    repeats: int
    class_tokens: str
    is_reg: bool
    items: list[ImageItem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


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


# ---- scanning ------------------------------------------------------------------------------------
def scan(root: str, caption_extension: str, is_reg: bool, warnings: list[str]) -> list[Subset]:
    """The ``<repeats>_<class words>`` folders under ``root`` with their readable images; problems go to ``warnings``."""
    what = "regularisation folder" if is_reg else "training folder"
    if not os.path.isdir(root):
        raise LoraError(root, f"{what} does not exist", "check train_data_dir / reg_data_dir")
    subsets = []
    entries = sorted(os.listdir(root))
    for entry in entries:
        path = os.path.join(root, entry)
        if not os.path.isdir(path) or entry.startswith("."):
            continue
        m = _RE_FOLDER.match(entry)
        if not m:
            warnings.append(f"{path}: skipped, the folder name is not '<repeats>_<class words>' (e.g. 10_cat)")
            continue
        repeats, class_tokens = int(m[1]), m[2].replace("_", " ").strip()
        if repeats < 1:
            warnings.append(f"{path}: skipped, 0 repeats")
            continue
        subset = Subset(path, repeats, class_tokens, is_reg)
        missing = 0
        for name in sorted(os.listdir(path)):
            file = os.path.join(path, name)
            if not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(file):
                continue
            size = _image_size(file, warnings)
            if size is None:
                continue
            caption = _read_caption(os.path.splitext(file)[0] + caption_extension, warnings)
            if caption is None:
                missing += 1
                caption = class_tokens
            subset.items.append(ImageItem(file, caption, subset.name, is_reg, size, repeats=repeats))
        if not subset.items:
            warnings.append(f"{path}: skipped, no readable images ({', '.join(IMAGE_EXTENSIONS)})")
            continue
        if missing:
            warnings.append(f"{path}: {missing} of {len(subset.items)} images have no {caption_extension} caption; "
                            f"they use the folder's class words {class_tokens!r}")
        subsets.append(subset)
    if not subsets and not is_reg:
        raise LoraError(root, "no usable training images",
                        "put images in subfolders named '<repeats>_<class words>', e.g. 10_cat, with captions "
                        "in .txt files beside them")
    return subsets


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


def _read_caption(path: str, warnings: list[str]) -> str | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        warnings.append(f"{path}: caption unreadable ({e.__class__.__name__}); the folder's class words are used")
        return None
    text = " ".join(text.split())
    return text or None


# ---- the dataset ---------------------------------------------------------------------------------
class Dataset:
    """Training items (with repeats), held-out validation items and regularisation items, bucketed."""

    def __init__(self, cfg: TrainConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.warnings: list[str] = []
        self.subsets = scan(cfg.train_data_dir, cfg.caption_extension, False, self.warnings)
        self.reg_subsets = scan(cfg.reg_data_dir, cfg.caption_extension, True, self.warnings) if cfg.reg_data_dir else []
        self.buckets = Buckets(cfg.resolution_wh(), cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps,
                               cfg.bucket_no_upscale, cfg.enable_bucket)
        self.validation = self._split_validation()
        errors = []
        for item in self.all_items():
            try:
                item.bucket, item.resized, err = self.buckets.assign(*item.size)
            except ValueError as e:
                self.warnings.append(f"{item.path}: skipped, {e}")
                item.repeats = 0
                continue
            errors.append(abs(err))
        for s in self.subsets + self.reg_subsets:
            s.items = [i for i in s.items if i.repeats]
        self.validation = [i for i in self.validation if i.repeats]
        if not self.train_items():
            raise LoraError(cfg.train_data_dir, "no usable training images left", "see the warnings above")
        self.mean_ar_error = sum(errors) / len(errors) if errors else 0.0
        self._balance_reg()

    def _split_validation(self) -> list[ImageItem]:
        """Take ``validation_split`` of each training folder out of training (at least one image, never all)."""
        if not self.cfg.validation_split:
            return []
        seed = self.cfg.validation_seed if self.cfg.validation_seed is not None else self.seed
        rng = random.Random(f"validation:{seed}")
        held = []
        for s in self.subsets:
            n = min(len(s.items) - 1, max(1, round(len(s.items) * self.cfg.validation_split)))
            if n < 1:
                self.warnings.append(f"{s.path}: only one image, none held out for validation")
                continue
            chosen = set(rng.sample(range(len(s.items)), n))
            held += [i for k, i in enumerate(s.items) if k in chosen]
            s.items = [i for k, i in enumerate(s.items) if k not in chosen]
        return held

    def _balance_reg(self) -> None:
        """kohya: regularisation images repeat (or are cut) until they number as many as the training images."""
        if not self.reg_subsets:
            return
        target = self.num_train_images
        for s in self.reg_subsets:
            for item in s.items:
                item.repeats = 0
        n, first = 0, True
        while n < target:
            for s in self.reg_subsets:
                for item in s.items:
                    add = s.repeats if first else 1
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
    def _epoch_pool(self) -> dict[tuple[int, int], list[ImageItem]]:
        pool: dict[tuple[int, int], list[ImageItem]] = {}
        for item in self.train_items() + self.reg_items():
            pool.setdefault(item.bucket, []).extend([item] * item.repeats)
        return dict(sorted(pool.items()))

    def batches_per_epoch(self) -> int:
        b = self.cfg.train_batch_size
        return sum(math.ceil(len(v) / b) for v in self._epoch_pool().values())

    def epoch_batches(self, seed: int, epoch: int) -> list[list[ImageItem]]:
        """One epoch's batches (each from one bucket), shuffled by (seed, epoch) only."""
        rng = random.Random(f"epoch:{seed}:{epoch}")
        b = self.cfg.train_batch_size
        batches = []
        for items in self._epoch_pool().values():
            items = items[:]
            rng.shuffle(items)
            batches += [items[k:k + b] for k in range(0, len(items), b)]
        rng.shuffle(batches)
        return batches

    def batch_choices(self, batch: list[ImageItem], seed: int, epoch: int, index: int
                      ) -> tuple[list[str], list[View]]:
        """Captions (shuffled/dropped) and views (flip, crop, hue) for one batch, drawn from (seed, epoch, batch
        index)."""
        rng = random.Random(f"batch:{seed}:{epoch}:{index}")
        captions = [process_caption(i.caption, self.cfg, rng, epoch) for i in batch]
        flips = [self.cfg.flip_aug and rng.random() < 0.5 for _ in batch]
        crops: list[tuple[int, int] | None] = [None] * len(batch)
        if self.cfg.random_crop:
            crops = [(rng.randint(0, i.resized[0] - i.bucket[0]), rng.randint(0, i.resized[1] - i.bucket[1]))
                     for i in batch]
        hues = [rng.uniform(-HUE_SHIFT, HUE_SHIFT) if self.cfg.color_aug else 0.0 for _ in batch]
        return captions, [View(f, c, h) for f, c, h in zip(flips, crops, hues)]

    # ---- metadata ------------------------------------------------------------------------------
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how many captions hold each (lower-cased) tag."""
        out: dict[str, dict[str, int]] = {}
        for s in self.subsets + self.reg_subsets:
            freq = out.setdefault(s.name, {})
            for item in s.items:
                for tag in item.caption.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        freq[tag] = freq.get(tag, 0) + 1
        return out

    def dirs_info(self, reg: bool) -> dict[str, dict[str, int]]:
        subsets = self.reg_subsets if reg else self.subsets
        return {s.name: {"n_repeats": s.repeats, "img_count": len(s.items)} for s in subsets}

    def bucket_info(self) -> dict:
        counts = Counter()
        for item in self.train_items() + self.reg_items():
            counts[item.bucket] += item.repeats
        buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
        return {"buckets": buckets, "mean_img_ar_error": self.mean_ar_error}


def with_affixes(caption: str, cfg: TrainConfig) -> str:
    """The caption with ``caption_prefix`` / ``caption_suffix``, joined by a space as kohya does."""
    if cfg.caption_prefix:
        caption = cfg.caption_prefix + " " + caption
    if cfg.caption_suffix:
        caption = caption + " " + cfg.caption_suffix
    return caption


def process_caption(caption: str, cfg: TrainConfig, rng: random.Random, epoch: int) -> str:
    """kohya's caption handling: prefix/suffix, then whole-caption dropout, else tag shuffle / tag dropout
    after keep_tokens."""
    caption = with_affixes(caption, cfg)
    every = cfg.caption_dropout_every_n_epochs
    dropped = rng.random() < cfg.caption_dropout_rate if cfg.caption_dropout_rate > 0 else False
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    if not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
    if cfg.shuffle_caption:
        rng.shuffle(rest)
    if cfg.caption_tag_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= cfg.caption_tag_dropout_rate]
    return ", ".join(kept + rest)
