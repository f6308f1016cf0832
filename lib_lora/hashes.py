"""File hashes exactly as the WebUI, Civitai and kohya compute them."""
from __future__ import annotations

import hashlib
import struct

BLOCK = 1024 * 1024


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def autov2(sha: str) -> str:
    """Civitai's AutoV2: the first 10 hex digits of the file's sha256."""
    return sha[:10]


def addnet_hash(path: str) -> str:
    """sha256 of the safetensors data after the header (the WebUI's ``addnet_hash_safetensors``;
    Civitai's AutoV3 and kohya's ``sshs_model_hash``). Metadata edits do not change it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        f.seek(n + 8 if len(head) == 8 else 0)
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_hash(path: str) -> str:
    """The old 8-digit model hash (kohya's ``sshs_legacy_hash``): 64 KiB read at offset 1 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def file_hashes(path: str) -> dict[str, str]:
    sha = sha256(path)
    out = {"sha256": sha, "autov2": autov2(sha)}
    out["autov3"] = addnet_hash(path) if path.lower().endswith(".safetensors") else sha
    return out
