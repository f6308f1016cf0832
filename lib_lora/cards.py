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
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser
from typing import Callable

from .catalog import Catalog, Entry
from .prompt import TOKEN
from .structure import Structure

TRY_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".preview.jpg", ".webp", ".preview.webp",
                    ".jpeg", ".preview.jpeg", ".gif", ".preview.gif")
# The editor's "sd version" values (the WebUI's own, and SD3) and the engine's family names.
SD_VERSIONS = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl", "SD3": "sd3"}
VERSION_OF = {v: k for k, v in SD_VERSIONS.items()}
MAX_INFO_BYTES = 16 * 1024 ** 2


def structure(entry: Entry) -> Structure:
    """The file's make-up, as the catalog read it from the header (once per file version)."""
    return entry.structure


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
    if low.startswith("sd 3"):  # "SD 3", "SD 3.5 Large", "SD 3.5 Medium", ...
        return "sd3"
    if low.startswith("sd 2"):
        return "sd2"
    if low.startswith("sd 1"):
        return "sd1"
    return None


def read_civitai(network_path: str, exists: Callable[[str], bool] = os.path.isfile) -> tuple[Civitai, str | None]:
    """``name.civitai.info`` beside the file (as model-site downloaders save it); (empty, reason) when
    it is missing or unreadable, never an exception. ``exists``: the card page's cached folder listing."""
    path = os.path.splitext(network_path)[0] + ".civitai.info"
    if not exists(path):
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
def base_model(user: dict, detected: str | None, civitai: Civitai) -> str | None:
    """The user's "sd version" first, then the file's structure, then civitai's label."""
    return SD_VERSIONS.get(str(user.get("sd version", ""))) or detected or civitai.base_model


def fits(family: str | None, model_family: str | None, show_all: bool = False, hide_unknown_for=()) -> bool:
    """Whether a card is shown beside a loaded model (the built-in's rules: ``lora_show_all`` and
    ``lora_hide_unknown_for_versions``, a list of "SD1"/"SD2"/"SDXL")."""
    if show_all or model_family is None:
        return True
    if family is None:
        return VERSION_OF.get(model_family) not in hide_unknown_for
    return family == model_family


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
    raw = metadata.get("ss_tag_frequency")
    return list(_tag_counts(raw)) if isinstance(raw, str) else []


@functools.lru_cache(maxsize=4096)
def _tag_counts(raw: str) -> tuple[tuple[str, int], ...]:
    """Counted once per distinct text: every card of a big library asks again on each page render."""
    freq = _json({"ss_tag_frequency": raw}, "ss_tag_frequency")
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
    return tuple(sorted(tags.items(), key=lambda kv: (-kv[1], kv[0])))


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
