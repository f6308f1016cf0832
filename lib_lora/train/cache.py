"""Image → latent, once: kept in memory and optionally on disk, keyed by the image's bytes and every setting
that changes the latent (bucket, resize, flip, VAE), so a later run with the same data reuses them."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import LoraError
from ..sidecar import atomic_write_bytes
from .dataset import ImageItem, View

CACHE_VERSION = 1
# kohya's resize_interpolation names as pillow filters ("area", OpenCV's INTER_AREA in kohya, is pillow's box filter)
FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
           "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}


def load_image(item: ImageItem, view: View = View()) -> torch.Tensor:
    """The item's pixels resized, cropped to its bucket (at ``view.crop`` = (left, top), else the centre),
    flipped and hue-shifted as the view says, [3, H, W] in [-1, 1]."""
    try:
        with Image.open(item.path) as im:
            im = im.convert("RGB")
            if im.size != item.resized:
                im = im.resize(item.resized, FILTERS[item.interpolation or "lanczos"])
    except Exception as e:  # any decoder failure means the same thing to the user
        raise LoraError(item.path, f"cannot decode the image ({e.__class__.__name__}: {str(e)[:120]})",
                        "re-save it or remove it from the folder") from None
    (w, h), (bw, bh) = item.resized, item.bucket
    left, top = view.crop if view.crop is not None else ((w - bw) // 2, (h - bh) // 2)
    im = im.crop((left, top, left + bw, top + bh))
    if view.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if view.hue:
        h, s, v = im.convert("HSV").split()
        shift = round(view.hue * 256)
        h = h.point(lambda x: (x + shift) % 256)
        im = Image.merge("HSV", (h, s, v)).convert("RGB")
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class LatentCache:
    """``get(items, flips)`` → latents [B, 4, h, w] (fp32, CPU), encoded through the caller's ``vae_encode``
    only when neither memory nor disk holds them."""

    def __init__(self, vae_encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str, memory: bool,
                 disk_dir: str | None = None):
        self.vae_encode = vae_encode
        self.vae_id = vae_id
        self.memory = memory
        self.disk_dir = disk_dir
        self._mem: dict[str, torch.Tensor] = {}
        self._file_hash: dict[tuple[str, int, int], str] = {}
        self.hits = {"memory": 0, "disk": 0, "encoded": 0}
        if disk_dir:
            os.makedirs(disk_dir, exist_ok=True)

    def key(self, item: ImageItem, view: View) -> str:
        st = os.stat(item.path)
        fkey = (item.path, st.st_mtime_ns, st.st_size)
        content = self._file_hash.get(fkey)
        if content is None:
            h = hashlib.sha256()
            with open(item.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            content = self._file_hash[fkey] = h.hexdigest()
        settings = json.dumps([CACHE_VERSION, content, list(item.resized), list(item.bucket), view.flip, self.vae_id]
                              + ([list(view.crop)] if view.crop is not None else [])
                              + ([view.hue] if view.hue else [])
                              + ([item.interpolation] if item.interpolation else []))
        return hashlib.sha256(settings.encode()).hexdigest()

    def _disk_path(self, key: str) -> str:
        return os.path.join(self.disk_dir, key[:2], key + ".safetensors")

    def lookup(self, key: str) -> torch.Tensor | None:
        hit = self._mem.get(key)
        if hit is not None:
            self.hits["memory"] += 1
            return hit
        if self.disk_dir and os.path.exists(self._disk_path(key)):
            try:
                with open(self._disk_path(key), "rb") as f:
                    hit = st_load(f.read())["latent"]
            except Exception:  # a damaged cache file is only a miss; it is rewritten below
                return None
            self.hits["disk"] += 1
            if self.memory:
                self._mem[key] = hit
            return hit
        return None

    def store(self, key: str, latent: torch.Tensor) -> None:
        if self.memory:
            self._mem[key] = latent
        if self.disk_dir:
            path = self._disk_path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_bytes(path, st_save({"latent": latent.contiguous()}))

    def encode(self, items: list[ImageItem], views: list[View]) -> list[torch.Tensor]:
        """Latents of images of one bucket, in one VAE call."""
        pixels = torch.stack([load_image(i, v) for i, v in zip(items, views)])
        with torch.no_grad():
            latents = self.vae_encode(pixels)
        if latents.dim() != 4 or latents.shape[0] != len(items):
            raise LoraError(None, f"vae_encode returned shape {tuple(latents.shape)} for {len(items)} images",
                            "it must return [batch, channels, height/8, width/8]")
        self.hits["encoded"] += len(items)
        return [t.detach().to("cpu", torch.float32).clone() for t in latents]

    def get(self, items: list[ImageItem], views: list[View]) -> torch.Tensor:
        """A batch of latents, encoding only what is not cached."""
        keys = [self.key(i, v) for i, v in zip(items, views)]
        out = [self.lookup(k) for k in keys]
        todo = [n for n, t in enumerate(out) if t is None]
        if todo:
            fresh = self.encode([items[n] for n in todo], [views[n] for n in todo])
            for n, t in zip(todo, fresh):
                out[n] = t
                self.store(keys[n], t)
        return torch.stack(out)

    def fill(self, jobs: list[tuple[ImageItem, View]], batch_size: int,
             progress: Callable[[int, int], bool] | None = None) -> None:
        """Encode every (item, view) ahead of training, bucket by bucket; ``progress`` returning False stops it."""
        by_bucket: dict[tuple[int, int], list[tuple[ImageItem, View]]] = {}
        for item, view in jobs:
            by_bucket.setdefault(item.bucket, []).append((item, view))
        done = 0
        for group in by_bucket.values():
            for k in range(0, len(group), batch_size):
                chunk = group[k:k + batch_size]
                self.get([i for i, _ in chunk], [v for _, v in chunk])
                done += len(chunk)
                if progress is not None and progress(done, len(jobs)) is False:
                    return
