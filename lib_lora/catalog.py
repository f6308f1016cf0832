"""The networks on disk: scanning the Lora folders, names, aliases, hashes, and a bounded cache.

A name from a prompt, the API or an infotext is only ever looked up in what the scan found; it is
never joined onto a path, so nothing outside the configured folders can be reached (symlinks that
leave a folder are skipped during the scan).
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from . import hashes, sidecar
from .errors import LoraError
from .network import Network, load
from .prompt import PromptError, check_name
from .safetensors_io import SUFFIXES, Limits, read_metadata

# Training states (lib_lora.train's and kohya's --save_state, also while being written) hold network and
# optimizer files that are not networks to use.
STATE_FOLDER_SUFFIXES = ("-state", "-state.tmp", "-state.old")


@dataclass
class Entry:
    name: str
    relpath: str
    path: str
    root: str
    mtime: float
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    metadata_error: str | None = None
    hash: str | None = None

    @property
    def alias(self) -> str:
        return self.metadata.get("ss_output_name") or self.name

    @property
    def shorthash(self) -> str:
        return (self.hash or "")[:12]


class Catalog:
    """Thread-safe view of the Lora folders; the WebUI glue, the API and the card page share one."""

    def __init__(self, roots: list[str], cache_file: str | None = None, cache_limit: int = 4, limits: Limits = Limits()):
        self.roots = [os.path.abspath(r) for r in roots if r]
        self.cache_file = cache_file
        self.cache_limit = cache_limit
        self.limits = limits
        self.entries: dict[str, Entry] = {}
        self._lock = threading.RLock()
        self._loaded: OrderedDict[str, Network] = OrderedDict()
        self._hash_cache = self._read_hash_cache()

    # ---- scanning -------------------------------------------------------------------------
    def refresh(self) -> None:
        found: dict[str, Entry] = {}
        for root in self.roots:
            if not os.path.isdir(root):
                continue
            real_root = os.path.realpath(root)
            for folder, dirs, files in os.walk(root, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.endswith(STATE_FOLDER_SUFFIXES))
                for fn in sorted(files):
                    if os.path.splitext(fn)[1].lower() not in SUFFIXES:
                        continue
                    path = os.path.join(folder, fn)
                    real = os.path.realpath(path)
                    if os.path.commonpath([real, real_root]) != real_root or not os.path.isfile(real):
                        continue
                    rel = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")
                    if rel in found:
                        continue
                    st = os.stat(path)
                    entry = Entry(os.path.splitext(fn)[0], rel, path, root, st.st_mtime, st.st_size)
                    try:
                        entry.metadata = read_metadata(path, self.limits)
                    except LoraError as e:
                        entry.metadata_error = e.message
                    entry.hash = self._cached_hash(entry)
                    found[rel] = entry
        with self._lock:
            self.entries = found
            for key in [k for k in self._loaded if k not in found or found[k].mtime != self._loaded[k].mtime]:
                del self._loaded[key]

    # ---- names ----------------------------------------------------------------------------
    def resolve(self, name: str, prefer_alias: bool = True) -> tuple[Entry | None, str | None]:
        """(entry, warning) for a name typed by a user: relative path, file name, alias or short hash."""
        try:
            name = check_name(name)
        except PromptError as e:
            return None, str(e)
        with self._lock:
            entries = list(self.entries.values())
        key = name.replace("\\", "/")
        for suffix in SUFFIXES:
            if key.lower().endswith(suffix):
                key = key[: -len(suffix)]
        exact = [e for e in entries if e.relpath == key]
        if exact:
            return exact[0], None
        by_name = [e for e in entries if e.name == key]
        by_alias = [e for e in entries if e.alias == key and e not in by_name] if prefer_alias else []
        hits = by_name or by_alias
        if not hits and len(key) >= 10 and all(c in "0123456789abcdefABCDEF" for c in key):
            hit = self.by_hash(key.lower())
            return hit, None
        if not hits:
            return None, None
        hits.sort(key=lambda e: (len(e.relpath), e.relpath))
        warning = None
        if len(hits) > 1:
            warning = (f"network name {name!r} is ambiguous ({', '.join(e.relpath for e in hits)}); "
                       f"using {hits[0].relpath}; write the folder to choose")
        return hits[0], warning

    def by_hash(self, shorthash: str) -> Entry | None:
        shorthash = shorthash.lower()
        with self._lock:
            entries = list(self.entries.values())
        for e in entries:
            if e.hash and e.hash.startswith(shorthash):
                return e
        for e in entries:
            if not e.hash and self.ensure_hash(e).startswith(shorthash):
                return e
        return None

    # ---- hashes ---------------------------------------------------------------------------
    def ensure_hash(self, entry: Entry) -> str:
        """The WebUI's hash for a network: kohya's ``sshs_model_hash`` if present, else computed."""
        if entry.hash:
            return entry.hash
        value = entry.metadata.get("sshs_model_hash")
        if not value:
            value = hashes.addnet_hash(entry.path) if entry.path.lower().endswith(".safetensors") else hashes.sha256(entry.path)
            with self._lock:
                self._hash_cache[entry.path] = {"mtime": entry.mtime, "size": entry.size, "hash": value}
                self._write_hash_cache()
        entry.hash = value
        return value

    def _cached_hash(self, entry: Entry) -> str | None:
        if entry.metadata.get("sshs_model_hash"):
            return entry.metadata["sshs_model_hash"]
        hit = self._hash_cache.get(entry.path)
        if hit and hit.get("mtime") == entry.mtime and hit.get("size") == entry.size:
            return hit.get("hash")
        return None

    def _read_hash_cache(self) -> dict:
        if not self.cache_file or not os.path.exists(self.cache_file):
            return {}
        try:
            with open(self.cache_file, encoding="utf8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_hash_cache(self) -> None:
        if self.cache_file:
            try:
                os.makedirs(os.path.dirname(self.cache_file), exist_ok=True)
                sidecar.atomic_write_text(self.cache_file, json.dumps(self._hash_cache))
            except OSError:
                pass

    # ---- loading --------------------------------------------------------------------------
    def load(self, entry: Entry) -> Network:
        """The decoded network, from the cache when the file is unchanged (LRU, ``cache_limit`` kept)."""
        try:
            mtime = os.path.getmtime(entry.path)
        except OSError:
            raise LoraError(entry.path, "the file is gone", "refresh the Lora list") from None
        with self._lock:
            net = self._loaded.get(entry.relpath)
            if net is not None and net.mtime == mtime:
                self._loaded.move_to_end(entry.relpath)
                return net
        net = load(entry.path, name=entry.name, limits=self.limits)
        with self._lock:
            self._loaded[entry.relpath] = net
            self._loaded.move_to_end(entry.relpath)
            self.trim()
        return net

    def trim(self, keep: set[str] | None = None) -> None:
        with self._lock:
            for key in list(self._loaded):
                if len(self._loaded) <= max(self.cache_limit, len(keep or ())):
                    break
                if keep and key in keep:
                    continue
                del self._loaded[key]

    def cached(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def user_metadata(self, entry: Entry) -> tuple[dict, str | None]:
        return sidecar.read_or_empty(entry.path)
