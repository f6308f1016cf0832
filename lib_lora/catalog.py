"""The networks on disk: scanning the Lora folders, names, aliases, hashes, and a bounded cache.

A name from a prompt, the API or an infotext is only ever looked up in what the scan found; it is
never joined onto a path, so nothing outside the configured folders can be reached (symlinks that
leave a folder are skipped during the scan).
"""
from __future__ import annotations

import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Callable

from . import hashes, sidecar
from .errors import LoraError
from .network import Network, load
from .prompt import PromptError, check_name
from .safetensors_io import SUFFIXES, Limits, gc_paused, read_header, read_listing
from .structure import Structure, structure_of

log = logging.getLogger("sd-webui-lora")
HASH_DIGITS = 10  # the shortest hash prefix a name may give (Civitai's AutoV2 length)
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
    structure: Structure = field(default_factory=Structure)

    @property
    def alias(self) -> str:
        return self.metadata.get("ss_output_name") or self.name

    @property
    def shorthash(self) -> str:
        return hashes.short_hash(self.hash)


class Catalog:
    """Thread-safe view of the Lora folders; the WebUI glue, the API and the card page share one.

    Lookups (path, name, alias, hash prefix) use indexes built by ``refresh``, so each costs the same for ten
    files or ten thousand. A file's header is read once per version (size and mtime): its metadata and structure
    are kept in ``file_cache`` (any mapping; the WebUI glue gives one that persists, so a restart reads no
    header again), keyed by path. Hashes come from the file's ``sshs_model_hash``, then from ``hash_cache``: a mapping
    in the WebUI's ``hashes-addnet`` format (``"lora/<name>": {"mtime", "sha256"}``), which the WebUI's own
    cache is, so hashes the built-in Lora computed are used and ours are kept for it. Missing ones are computed
    by one background thread when a hash lookup needs them, never while a request waits.
    """

    def __init__(self, roots: list[str], hash_cache: MutableMapping | None = None, cache_limit: int = 4,
                 limits: Limits = Limits(), caches_written: Callable[[], None] | None = None,
                 file_cache: MutableMapping | None = None):
        self.roots = [os.path.abspath(r) for r in roots if r]
        self.hash_cache = {} if hash_cache is None else hash_cache
        self.file_cache = {} if file_cache is None else file_cache
        self.caches_written = caches_written
        self.cache_limit = cache_limit
        self.limits = limits
        self.entries: dict[str, Entry] = {}
        self._by_name: dict[str, list[Entry]] = {}
        self._by_alias: dict[str, list[Entry]] = {}
        self._by_hash: dict[str, list[Entry]] = {}
        self._lock = threading.RLock()
        self._loaded: OrderedDict[str, Network] = OrderedDict()
        self._hasher = hashes.BackgroundHasher(self._hashed)

    # ---- scanning -------------------------------------------------------------------------
    def refresh(self) -> None:
        with gc_paused():  # each new file's header and structure: see gc_paused
            found = self._scan()
        by_name: dict[str, list[Entry]] = {}
        by_alias: dict[str, list[Entry]] = {}
        for entry in found.values():
            by_name.setdefault(entry.name, []).append(entry)
            by_alias.setdefault(entry.alias, []).append(entry)
        for entry in found.values():
            entry.hash = entry.metadata.get("sshs_model_hash") or self._cached_hash(entry, by_name)
        if self.caches_written is not None:
            self.caches_written()
        with self._lock:
            self.entries, self._by_name, self._by_alias = found, by_name, by_alias
            self._by_hash = {}
            for entry in found.values():
                if entry.hash:
                    self._index_hash(entry)
            for key in [k for k in self._loaded if k not in found or found[k].mtime != self._loaded[k].mtime]:
                del self._loaded[key]

    def _scan(self) -> dict[str, Entry]:
        """Every network file under the roots by relative path (the first root wins), with its facts."""
        found: dict[str, Entry] = {}
        for root in self.roots:
            if not os.path.isdir(root):
                continue
            real_root = os.path.realpath(root)
            for folder, dirs, files in os.walk(root, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.endswith(STATE_FOLDER_SUFFIXES))
                sub = os.path.relpath(folder, root)
                prefix = "" if sub == os.curdir else sub.replace(os.sep, "/") + "/"
                for fn in sorted(files):
                    stem, suffix = os.path.splitext(fn)
                    if suffix.lower() not in SUFFIXES:
                        continue
                    path = os.path.join(folder, fn)
                    # os.walk does not enter linked folders: only a linked file can lead out of the root
                    if os.path.islink(path) and os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
                        continue
                    try:
                        st = os.stat(path)
                    except OSError:  # a dangling link, or gone since the listing
                        continue
                    rel = prefix + stem
                    if not stat.S_ISREG(st.st_mode) or rel in found:
                        continue
                    entry = Entry(stem, rel, path, root, st.st_mtime, st.st_size)
                    self._read_facts(entry)
                    found[rel] = entry
        return found

    def _read_facts(self, entry: Entry) -> None:
        """Metadata, header problem and structure of the file's current version, from ``file_cache`` or its header."""
        try:
            known = self.file_cache.get(entry.path)
        except (OSError, RuntimeError, ValueError):
            known = None
        if isinstance(known, dict) and known.get("mtime") == entry.mtime and known.get("size") == entry.size \
                and known.get("max_file_bytes") == self.limits.max_file_bytes:
            entry.metadata, entry.metadata_error = dict(known["metadata"]), known["error"]
            entry.structure = Structure.from_json(known["structure"])
            return
        if entry.path.lower().endswith(".safetensors"):
            try:
                shapes, metadata = read_listing(entry.path, self.limits)
                try:
                    structure = structure_of(shapes, metadata)
                except (TypeError, ValueError, KeyError, IndexError):  # an entry read_listing leaves unchecked
                    read_header(entry.path, self.limits)  # raises, naming it
                    raise
            except LoraError as e:
                self._unusable(entry, e)
                return
            entry.metadata, entry.structure = metadata, structure
        self._remember_facts(entry)

    def _unusable(self, entry: Entry, e: LoraError) -> None:
        """The file's problem, on its card and kept with its facts."""
        entry.metadata_error, entry.structure = e.message, Structure(error=e.reason)
        self._remember_facts(entry)

    def _remember_facts(self, entry: Entry) -> None:
        try:
            self.file_cache[entry.path] = {"mtime": entry.mtime, "size": entry.size, "max_file_bytes": self.limits.max_file_bytes,
                                           "metadata": entry.metadata, "error": entry.metadata_error,
                                           "structure": entry.structure.to_json()}
        except (OSError, RuntimeError, ValueError) as e:  # not kept: the header is read again next time
            log.debug("file cache not written: %s", e)

    # ---- names ----------------------------------------------------------------------------
    def resolve(self, name: str, prefer_alias: bool = True) -> tuple[Entry | None, str | None]:
        """(entry, warning) for a name typed by a user: relative path, file name, alias or short hash."""
        try:
            name = check_name(name)
        except PromptError as e:
            return None, str(e)
        key = name.replace("\\", "/")
        for suffix in SUFFIXES:
            if key.lower().endswith(suffix):
                key = key[: -len(suffix)]
        with self._lock:
            exact = self.entries.get(key)
            if exact is not None:
                return exact, None
            by_name = list(self._by_name.get(key, ()))
            by_alias = [e for e in self._by_alias.get(key, ()) if e not in by_name] if prefer_alias else []
        hits = by_name or by_alias
        if not hits and len(key) >= HASH_DIGITS and all(c in "0123456789abcdefABCDEF" for c in key):
            hit, pending = self.by_hash(key)
            return hit, None if hit else self.hashing_note(key, pending)
        if not hits:
            return None, None
        hits.sort(key=lambda e: (len(e.relpath), e.relpath))
        warning = None
        if len(hits) > 1:
            warning = (f"network name {name!r} is ambiguous ({', '.join(e.relpath for e in hits)}); "
                       f"using {hits[0].relpath}; write the folder to choose")
        return hits[0], warning

    def by_hash(self, shorthash: str) -> tuple[Entry | None, list[Entry]]:
        """The file whose hash starts with ``shorthash`` (at least 10 hex digits) among the hashes known now, and
        the files whose hash is not known yet. Those are queued for the background hasher; nothing waits for it."""
        shorthash = shorthash.lower()
        with self._lock:
            hits = [e for e in self._by_hash.get(shorthash[:HASH_DIGITS], ()) if e.hash.startswith(shorthash)]
            if hits:
                return min(hits, key=lambda e: (len(e.relpath), e.relpath)), []
            unknown = {e.path: e for e in self.entries.values() if not e.hash}
        self._hasher.submit(list(unknown))
        return None, [unknown[p] for p in self._hasher.pending() if p in unknown]

    @staticmethod
    def hashing_note(shorthash: str, pending: list[Entry]) -> str | None:
        """What a lookup of an unknown hash tells the user while files are still being hashed."""
        if not pending:
            return None
        names = ", ".join(e.relpath for e in pending[:5]) + (f" and {len(pending) - 5} more" if len(pending) > 5 else "")
        return (f"no network with hash {shorthash} is known yet; {len(pending)} file(s) are still being hashed in the "
                f"background ({names}); try again when they are done")

    def hashing(self) -> list[str]:
        """Files queued for the background hasher or being hashed."""
        return self._hasher.pending()

    # ---- hashes ---------------------------------------------------------------------------
    def ensure_hash(self, entry: Entry) -> str:
        """The WebUI's hash for a network: kohya's ``sshs_model_hash`` if present, else the cached or computed
        ``webui_hash``. Computes in the caller's thread: for the file a job uses, as the built-in does."""
        if not entry.hash:
            value = hashes.webui_hash(entry.path)
            self._hashed(entry.path, value)
            entry.hash = entry.hash or value
        return entry.hash

    def _hashed(self, path: str, value: str) -> None:
        """A computed hash: onto the catalog's entry for this file (if unchanged since) and into the hash cache."""
        with self._lock:
            entry = next((e for e in self._by_name.get(os.path.splitext(os.path.basename(path))[0], ()) if e.path == path), None)
            if entry is None or entry.hash:
                return
            try:
                if os.path.getmtime(path) != entry.mtime:
                    return
            except OSError:
                return
            entry.hash = value
            self._index_hash(entry)
            key = self._cache_key(entry, self._by_name)
        try:
            self.hash_cache[key] = {"mtime": entry.mtime, "sha256": value}
            if self.caches_written is not None:
                self.caches_written()
        except (OSError, RuntimeError, ValueError) as e:  # a cache that cannot be written only costs a rehash later
            log.debug("hash cache not written: %s", e)

    def _index_hash(self, entry: Entry) -> None:
        self._by_hash.setdefault(entry.hash[:HASH_DIGITS].lower(), []).append(entry)

    @staticmethod
    def _cache_key(entry: Entry, by_name: dict[str, list[Entry]]) -> str:
        """The built-in's key, ``lora/<file name>``, when that name is unique; else one of ours with the full path
        (the built-in's key could then belong to another file of that name)."""
        return f"lora/{entry.name}" if len(by_name.get(entry.name, ())) == 1 else f"lora/{entry.path}"

    def _cached_hash(self, entry: Entry, by_name: dict[str, list[Entry]]) -> str | None:
        """As the WebUI's ``sha256_from_cache``: valid while the file is not newer than the cached hash."""
        try:
            hit = self.hash_cache.get(self._cache_key(entry, by_name))
        except (OSError, RuntimeError, ValueError):
            return None
        if not isinstance(hit, dict) or not isinstance(hit.get("sha256"), str):
            return None
        try:
            fresh = entry.mtime <= float(hit.get("mtime", 0))
        except (TypeError, ValueError):
            return None
        return hit["sha256"] if fresh else None

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
        try:
            net = load(entry.path, name=entry.name, limits=self.limits)
        except LoraError as e:
            if e.file == entry.path and mtime == entry.mtime:  # what the listing did not check: on the card from now on
                self._unusable(entry, e)
            raise
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
