"""File hashes exactly as the WebUI, Civitai and kohya compute them, and a background thread that computes them
for a library without holding anything up."""
from __future__ import annotations

import hashlib
import os
import queue
import struct
import sys
import threading
from typing import Callable

BLOCK = 1024 * 1024


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def short_hash(sha: str | None) -> str:
    """The 12 hex digits of a sha256 the WebUI shows and writes in infotexts ("" when not hashed yet)."""
    return (sha or "")[:12]


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


def webui_hash(path: str) -> str:
    """The hash the WebUI's Lora keeps for a network file (``use_addnet_hash`` for safetensors)."""
    return addnet_hash(path) if path.lower().endswith(".safetensors") else sha256(path)


def file_hashes(path: str) -> dict[str, str]:
    sha = sha256(path)
    out = {"sha256": sha, "autov2": autov2(sha)}
    out["autov3"] = addnet_hash(path) if path.lower().endswith(".safetensors") else sha
    return out


class BackgroundHasher:
    """One daemon thread hashing the files queued to it (``webui_hash``), at the lowest CPU priority the system
    gives a thread, so that hashing a library of thousands of files never delays a request or a generation.
    ``done(path, hash)`` is called from that thread; a file that cannot be read is dropped silently (the caller
    still has no hash for it)."""

    def __init__(self, done: Callable[[str, str], None]):
        self._done = done
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: dict[str, None] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, paths: list[str]) -> None:
        with self._lock:
            for path in paths:
                if path not in self._pending:
                    self._pending[path] = None
                    self._queue.put(path)
            if self._pending and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="sd-webui-lora hashing", daemon=True)
                self._thread.start()

    def pending(self) -> list[str]:
        """Files queued or being hashed, in queue order."""
        with self._lock:
            return list(self._pending)

    def _run(self) -> None:
        _lowest_priority()
        while True:
            try:
                path = self._queue.get(timeout=5)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            try:
                value = webui_hash(path)
            except OSError:
                value = None
            if value is not None:
                self._done(path, value)
            with self._lock:
                self._pending.pop(path, None)


def _lowest_priority() -> None:
    """Nice 19 for the calling thread only (Linux keeps a nice value per thread); elsewhere the thread runs at the
    normal priority, since the process-wide call would slow down the WebUI itself."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
