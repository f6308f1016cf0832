"""Mirrors modules/hashes.py: ``cache(subsection)`` (a dict-like store per subsection, diskcache in v1.10,
cache.json in v1.6-v1.8) and ``dump_cache()``."""
caches: dict[str, dict] = {}
dumps = 0


def cache(subsection: str) -> dict:
    return caches.setdefault(subsection, {})


def dump_cache() -> None:
    global dumps
    dumps += 1
