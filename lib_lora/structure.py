"""A network file's make-up as its safetensors header tells it (kinds of modules, rank, base model, DoRA), named by
the engine's own adapter kinds, on shapes only: no tensor byte is read. The catalog computes it once per file
version (the header is read at scan time anyway) and keeps it with the file's metadata; files of the same make
share one computation."""
from __future__ import annotations

import hashlib
import marshal
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .adapters import Adapter, UnusableModule, count_shown_kinds, kind_label, make_adapter
from .keymap import FAMILY_METADATA, detect_family
from .network import KeyLayout

LARGE_RANK = 32


@dataclass(frozen=True)
class Structure:
    """A file's make-up; ``error`` when the header is unusable."""

    kind_counts: dict[str, int] = field(default_factory=dict)  # shown kind → modules
    rank: int | None = None
    base_model: str | None = None
    dora: bool = False
    error: str | None = None

    @property
    def kind(self) -> str | None:
        """The label of the most common kind, e.g. "LoRA", "LoCon", "LoHa+DoRA"."""
        if not self.kind_counts:
            return None
        return kind_label(max(self.kind_counts, key=self.kind_counts.get), self.dora)

    @property
    def large(self) -> bool:
        return self.rank is not None and self.rank >= LARGE_RANK

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Structure:
        return cls(dict(data.get("kind_counts") or {}), data.get("rank"), data.get("base_model"),
                   bool(data.get("dora")), data.get("error"))


MAKES_KEPT = 1024
_makes: OrderedDict[bytes, Structure] = OrderedDict()
_makes_lock = threading.Lock()


def structure_of(shapes: dict[str, Sequence[int]], metadata: dict[str, str]) -> Structure:
    """The structure of a file with these tensor shapes and metadata (``read_listing``); computed once per make
    (tensor names and shapes, and the metadata the base model may be read from), which a library's files share:
    thousands of files come from a few trainer settings."""
    make = hashlib.blake2b(marshal.dumps((shapes, [metadata.get(k) for k in FAMILY_METADATA])), digest_size=16).digest()
    with _makes_lock:
        known = _makes.get(make)
        if known is not None:
            _makes.move_to_end(make)
            return known
    known = _structure(shapes, metadata)
    with _makes_lock:
        _makes[make] = known
        if len(_makes) > MAKES_KEPT:
            _makes.popitem(last=False)
    return known


def _structure(shapes: dict[str, Sequence[int]], metadata: dict[str, str]) -> Structure:
    """The file's keys in modules, named by the adapter kinds on meta tensors. Modules of the same make-up
    (tensor names and shapes) are named once: a file has hundreds of modules, few makes."""
    layout = KeyLayout.of(shapes)
    named: dict[tuple, Adapter | None] = {}
    adapters = []
    for keys in layout.modules.values():
        # alpha is left out: a scalar whose value the adapters would read
        make = tuple(sorted((param, tuple(shapes[key])) for param, key in keys.items() if param != "alpha"))
        if make not in named:
            named[make] = _adapter(make)
        if named[make] is not None:
            adapters.append(named[make])
    ranks = Counter(a.rank for a in adapters if a.rank and not a.rank_is_block_size)
    family = detect_family(layout.split, {k: tuple(shapes[k]) for k in layout.split}, metadata)
    kinds = count_shown_kinds(adapters)
    return Structure(kinds, ranks.most_common(1)[0][0] if ranks else None, family,
                     any(a.magnitude is not None for a in adapters), None if kinds else "no network modules recognised")


def _adapter(make: tuple[tuple[str, tuple[int, ...]], ...]) -> Adapter | None:
    try:
        return make_adapter("", {param: torch.empty(shape, device="meta") for param, shape in make})
    except (UnusableModule, KeyError, IndexError, RuntimeError):
        return None
