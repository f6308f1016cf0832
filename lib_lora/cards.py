"""What a card on the Lora page shows and is found by, decided without the WebUI and without reading
any tensor: kind and rank come from the safetensors header's shapes, trigger-word suggestions from
kohya's ``ss_tag_frequency`` and a ``name.civitai.info``, the base model from the file's structure
unless the user or civitai says otherwise.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser
from typing import Callable

import torch

from .adapters import make_adapter
from .catalog import Catalog, Entry
from .errors import LoraError
from .keymap import detect_family, split_key
from .prompt import TOKEN
from .safetensors_io import Header, read_header

LARGE_RANK = 32
TRY_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".preview.jpg", ".webp", ".preview.webp",
                    ".jpeg", ".preview.jpeg", ".gif", ".preview.gif")
# The editor's "sd version" values (the WebUI's own) and the engine's family names.
SD_VERSIONS = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl"}
VERSION_OF = {v: k for k, v in SD_VERSIONS.items()}
KIND_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "full": "Full",
               "norm": "Norm", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA"}
MAX_INFO_BYTES = 16 * 1024 ** 2


@dataclass(frozen=True)
class Structure:
    """A file's make-up as its header tells it; ``error`` when the header is unusable."""

    kinds: dict[str, int] = field(default_factory=dict)
    rank: int | None = None
    base_model: str | None = None
    dora: bool = False
    error: str | None = None

    @property
    def kind(self) -> str | None:
        """The label of the most common kind, e.g. "LoRA", "LoCon", "LoHa+DoRA"."""
        if not self.kinds:
            return None
        kind = max(self.kinds, key=self.kinds.get)
        if self.dora:
            return "DoRA" if kind in ("lora", "locon") else KIND_LABELS[kind] + "+DoRA"
        return KIND_LABELS.get(kind, kind)

    @property
    def large(self) -> bool:
        return self.rank is not None and self.rank >= LARGE_RANK


def structure_from_header(header: Header) -> Structure:
    """Group the header's keys into modules and let the engine's adapter kinds name them, on shapes only
    (meta tensors: nothing is read or allocated)."""
    split = {k: s for k in header.tensors if (s := split_key(k)) is not None}
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, (part, module, param) in split.items():
        if param != "alpha":  # a scalar whose value the adapters would read
            groups.setdefault((part, module), {})[param] = torch.empty(header.tensors[key].shape, device="meta")
    kinds: Counter[str] = Counter()
    ranks: Counter[int] = Counter()
    dora = False
    for w in groups.values():
        try:
            adapter = make_adapter("", w)
        except (KeyError, IndexError, RuntimeError):
            adapter = None
        if adapter is None:
            continue
        kind = adapter.kind
        down = w.get("lora_down.weight")
        if kind == "lora" and down is not None and down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
            kind = "locon"
        kinds[kind] += 1
        dora = dora or adapter.magnitude is not None
        if adapter.rank and kind not in ("oft", "boft"):  # an OFT "rank" is a block size
            ranks[adapter.rank] += 1
    family = detect_family(split, {k: header.tensors[k].shape for k in split}, header.metadata)
    if kinds and {"lora", "locon"} <= set(kinds):
        kinds["locon"] += kinds.pop("lora")
    rank = ranks.most_common(1)[0][0] if ranks else None
    return Structure(dict(kinds), rank, family, dora, None if kinds else "no network modules recognised")


@functools.lru_cache(maxsize=4096)
def _structure(path: str, mtime: float, size: int) -> Structure:
    if not path.lower().endswith(".safetensors"):
        return Structure()
    try:
        return structure_from_header(read_header(path))
    except LoraError as e:
        return Structure(error=e.reason)


def structure(entry: Entry) -> Structure:
    """Cached per file version, so a page refresh reads only new or changed headers."""
    return _structure(entry.path, entry.mtime, entry.size)


# ---- civitai.info -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Civitai:
    trained_words: tuple[str, ...] = ()
    base_model: str | None = None        # engine family, when civitai's label maps to one
    base_label: str = ""                 # civitai's own label, e.g. "SD 1.5", "Pony"
    description: str = ""


def civitai_family(label: str) -> str | None:
    low = label.lower().strip()
    if low.startswith("sdxl") or low.startswith(("pony", "illustrious", "noobai")):
        return "sdxl"
    if low.startswith("sd 2"):
        return "sd2"
    if low.startswith("sd 1"):
        return "sd1"
    return None


def read_civitai(network_path: str) -> tuple[Civitai, str | None]:
    """``name.civitai.info`` beside the file (as model-site downloaders save it); (empty, reason) when
    it is missing or unreadable, never an exception."""
    path = os.path.splitext(network_path)[0] + ".civitai.info"
    if not os.path.isfile(path):
        return Civitai(), None
    try:
        if os.path.getsize(path) > MAX_INFO_BYTES:
            return Civitai(), f"{os.path.basename(path)} is over {MAX_INFO_BYTES >> 20} MiB; ignored"
        with open(path, encoding="utf8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return Civitai(), f"{os.path.basename(path)} is unreadable ({e.__class__.__name__}); ignored"
    if not isinstance(data, dict):
        return Civitai(), f"{os.path.basename(path)} is not a JSON object; ignored"
    words = []
    for item in data.get("trainedWords") or []:
        for word in str(item).split(","):
            if word.strip() and word.strip() not in words:
                words.append(word.strip())
    label = str(data.get("baseModel") or "")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    desc = data.get("description") or model.get("description") or ""
    return Civitai(tuple(words), civitai_family(label), label, html_to_text(str(desc))), None


class _Text(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "p", "li", "div", "h1", "h2", "h3", "h4"):
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(data)


def html_to_text(text: str) -> str:
    """Civitai descriptions are HTML; cards show plain text."""
    parser = _Text()
    parser.feed(text)
    parser.close()
    return re.sub(r"\n\s*\n+", "\n", "".join(parser.parts)).strip()


# ---- user metadata and base model -----------------------------------------------------------------
def preferred_weight(user: dict) -> float:
    """The sidecar's "preferred weight"; 0 (use the default) when absent or not a number."""
    try:
        value = float(user.get("preferred weight") or 0)
    except (TypeError, ValueError):
        return 0.0
    return value if 0 < value <= 100 else 0.0


def base_model(user: dict, detected: str | None, civitai: Civitai) -> str | None:
    """The user's "sd version" first, then the file's structure, then civitai's label."""
    return SD_VERSIONS.get(str(user.get("sd version", ""))) or detected or civitai.base_model


def fits(family: str | None, model_family: str | None, hide_incompatible: bool) -> bool:
    """Unknown families are always shown: hiding a usable file is worse than showing an unusable one."""
    return not hide_incompatible or family is None or model_family is None or family == model_family


def description(user: dict, civitai: Civitai) -> str:
    return str(user.get("description") or "") or civitai.description


# ---- training tags ------------------------------------------------------------------------------
def _json(metadata: dict, key: str):
    value = metadata.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def tag_counts(metadata: dict) -> list[tuple[str, int]]:
    """All folders' ``ss_tag_frequency`` summed, most frequent first; caption sets made of sentences
    rather than comma tags are counted by word (as the WebUI's editor does)."""
    freq = _json(metadata, "ss_tag_frequency")
    tags: Counter[str] = Counter()
    if isinstance(freq, dict):
        for folder in freq.values():
            if isinstance(folder, dict):
                for tag, count in folder.items():
                    try:
                        tags[str(tag).strip()] += int(count)
                    except (TypeError, ValueError):
                        continue
    tags.pop("", None)
    if tags and sum(len(t) for t in tags) / len(tags) >= 16:
        words: Counter[str] = Counter()
        for text, count in tags.items():
            for word in re.findall(r"[-_\w']+", text):
                if len(word) >= 3:
                    words[word] += count
        tags = words
    return sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))


def suggestions(metadata: dict, civitai: Civitai, limit: int = 30) -> list[tuple[str, str]]:
    """(word, where from) candidates: civitai's trained words first, then training tags with counts."""
    out = [(w, "civitai") for w in civitai.trained_words]
    seen = {w for w, _ in out}
    for tag, count in tag_counts(metadata):
        if len(out) >= limit:
            break
        if tag not in seen:
            out.append((tag, str(count)))
    return out


def toggle_word(text: str, word: str) -> str:
    """Add ``word`` to a comma list, or remove it when it is already there."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    return ", ".join([w for w in words if w != word] if word in words else words + [word])


# ---- what a card is found by ------------------------------------------------------------------------
def search_terms(entry: Entry, user: dict, civitai: Civitai, struct: Structure, family: str | None) -> list[str]:
    terms = [entry.relpath, entry.name, entry.alias, entry.hash or ""]
    terms += [str(user.get("activation text") or ""), *civitai.trained_words]
    terms += [tag for tag, _ in tag_counts(entry.metadata)[:10]]
    if family:
        terms += [VERSION_OF[family], f"base:{family}"]
    if struct.kind:
        terms.append(struct.kind)
    return [t for t in dict.fromkeys(terms) if t]


def prompt_name(catalog: Catalog, entry: Entry, prefer_alias: bool) -> str:
    """The shortest name that a prompt resolves to this very file without a warning."""
    candidates = ([entry.alias] if prefer_alias else []) + [entry.name, entry.relpath]
    for name in candidates:
        if ":" not in name and catalog.resolve(name, prefer_alias) == (entry, None):
            return name
    return entry.relpath


def preview_path(base: str, exists: Callable[[str], bool]) -> str | None:
    """The first preview beside ``base`` (the network's path without its extension)."""
    return next((base + s for s in PREVIEW_SUFFIXES if exists(base + s)), None)


# ---- the editor's file table ----------------------------------------------------------------------
def _when(value) -> str:
    try:
        return datetime.fromtimestamp(float(value), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def _resolutions(metadata: dict) -> str:
    info = _json(metadata, "ss_bucket_info")
    counts: Counter[str] = Counter()
    if isinstance(info, dict) and isinstance(info.get("buckets"), dict):
        for bucket in info["buckets"].values():
            try:
                w, h = bucket["resolution"]
                counts[f"{w}x{h}"] += int(bucket.get("count", 0))
            except (KeyError, TypeError, ValueError):
                continue
    if counts:
        return ", ".join(r for r, _ in counts.most_common(6)) + (", …" if len(counts) > 6 else "")
    res = metadata.get("ss_resolution")
    return re.sub(r"[()\s]", "", str(res)).replace(",", "x") if res else ""


def dataset_folders(metadata: dict) -> list[str]:
    dirs = _json(metadata, "ss_dataset_dirs")
    out = []
    if isinstance(dirs, dict):
        for name, info in dirs.items():
            info = info if isinstance(info, dict) else {}
            out.append(f"{name} ({info.get('img_count', '?')} images × {info.get('n_repeats', '?')} repeats)")
    return out


TRAINING_KEYS = (
    ("Trained on", "ss_sd_model_name"), ("Base model version", "ss_base_model_version"),
    ("Network module", "ss_network_module"), ("Network args", "ss_network_args"),
    ("Output name", "ss_output_name"), ("Epoch", "ss_epoch"), ("Epochs", "ss_num_epochs"),
    ("Steps", "ss_steps"), ("Max steps", "ss_max_train_steps"), ("Training images", "ss_num_train_images"),
    ("Learning rate", "ss_learning_rate"), ("UNet LR", "ss_unet_lr"), ("Text encoder LR", "ss_text_encoder_lr"),
    ("Clip skip", "ss_clip_skip"), ("Seed", "ss_seed"),
)


def training_rows(metadata: dict) -> list[tuple[str, str]]:
    """kohya's ``ss_*`` training metadata as (label, text) rows; absent or "None" values are left out."""
    rows = []
    dim, alpha = metadata.get("ss_network_dim"), metadata.get("ss_network_alpha")
    if dim or alpha:
        rows.append(("Dim / alpha", f"{dim or '?'} / {alpha or '?'}"))
    for label, key in TRAINING_KEYS:
        value = metadata.get(key)
        if value not in (None, "", "None", "null"):
            rows.append((label, str(value)))
    if _resolutions(metadata):
        rows.append(("Resolution", _resolutions(metadata)))
    for label, key in (("Training started", "ss_training_started_at"), ("Training finished", "ss_training_finished_at")):
        if _when(metadata.get(key)):
            rows.append((label, _when(metadata.get(key))))
    folders = dataset_folders(metadata)
    if folders:
        rows.append(("Dataset folders", "; ".join(folders)))
    return rows


def weight_prompts(prompt: str, name: str, activation: str, is_this: Callable[[str], bool],
                   weights: tuple[float, ...] = TRY_WEIGHTS) -> list[str]:
    """One prompt per weight: this network's own tokens taken out of ``prompt``, then ``<lora:name:w>``
    and the activation text (unless the prompt has it already) added."""
    base = TOKEN.sub(lambda m: "" if is_this(m.group(2).split(":")[0]) else m.group(0), prompt or "").strip()
    extra = f", {activation}" if activation and activation not in base else ""
    return [f"{base} <lora:{name}:{w:g}>{extra}".strip() for w in weights]
