"""What a network file holds, as one JSON-able summary (used by the CLI, the card panel and the API)."""
from __future__ import annotations

import os

from .hashes import file_hashes
from .network import Network, load
from .safetensors_io import Limits


def network_summary(net: Network, hashes: dict[str, str] | None = None) -> dict:
    return {
        "name": net.name,
        "file": net.path,
        "format": net.format,
        "base_model": net.base_model,
        "kinds": net.kind_counts,
        "modules": len(net.modules),
        "rank": net.rank,
        "alpha": net.alpha,
        "unmatched": len(net.unmatched),
        "embeddings": sorted(net.embeddings),
        "metadata": net.metadata,
        "hashes": hashes if hashes is not None else file_hashes(net.path),
        "size": net.size or (os.path.getsize(net.path) if os.path.exists(net.path) else 0),
    }


def file_summary(path: str, limits: Limits = Limits()) -> dict:
    return network_summary(load(path, limits=limits))
