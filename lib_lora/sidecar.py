"""The WebUI's user-metadata sidecar (``name.json`` beside the network file), read and written safely.

Keys the WebUI knows are kept as it writes them; unknown keys survive every write; writes go to a temp
file that is renamed over the old one, so a crash or a full disk leaves the old file intact; a corrupt
sidecar is reported and kept aside as ``name.json.bad``, never silently overwritten.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Callable

from .errors import LoraError
from .prompt import MAX_WEIGHT

KEYS = ("description", "activation text", "preferred weight", "negative text", "notes", "sd version")


def sidecar_path(network_path: str) -> str:
    return os.path.splitext(network_path)[0] + ".json"


def read(network_path: str, exists: Callable[[str], bool] = os.path.exists) -> dict:
    """The sidecar's contents ({} when there is none); LoraError when it is corrupt. ``exists``: the card page's
    cached folder listing (a stat per card costs more than the rest of a card)."""
    path = sidecar_path(network_path)
    if not exists(path):
        return {}
    try:
        with open(path, encoding="utf8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LoraError(path, f"user metadata is unreadable ({e.__class__.__name__})",
                        "fix or delete it; saving from the editor will keep it aside as .json.bad") from None
    if not isinstance(data, dict):
        raise LoraError(path, "user metadata is not a JSON object", "fix or delete it")
    return data


def preferred_weight(user: dict) -> float:
    """The sidecar's "preferred weight": a finite number within a prompt's weight limit (±MAX_WEIGHT); 0, meaning
    unset (the default weight), when absent, zero, out of range or not a number."""
    try:
        value = float(user.get("preferred weight") or 0)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and abs(value) <= MAX_WEIGHT else 0.0


def read_or_empty(network_path: str, exists: Callable[[str], bool] = os.path.exists) -> tuple[dict, str | None]:
    try:
        return read(network_path, exists), None
    except LoraError as e:
        return {}, e.message


def write(network_path: str, values: dict) -> dict:
    """Merge ``values`` into the sidecar (unknown keys kept) and write it atomically."""
    path = sidecar_path(network_path)
    try:
        data = read(network_path)
    except LoraError:
        shutil.copyfile(path, path + ".bad")
        data = {}
    data.update(values)
    atomic_write_text(path, json.dumps(data, indent=4, ensure_ascii=False))
    return data


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(temp path)`` for a temp file in the same folder, fsync, then rename over ``path``: a crash leaves
    the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, payload: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf8"))
