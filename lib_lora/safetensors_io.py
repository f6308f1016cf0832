"""Reading network files without trusting them.

The safetensors header is checked in full (size, JSON, dtypes, shapes against byte ranges, ranges inside
the file and not overlapping) before any tensor byte is touched; pickled formats go only through
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import gc
import json
import math
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .errors import LoraError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)

# The safetensors library writes tensors by this order of dtypes, last first (then by name): larger elements
# come first, so every tensor is aligned to its element size.
WRITE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class Limits:
    """Sizes past which a file is refused before it is read."""

    max_file_bytes: int = 4 * 1024 ** 3
    max_header_bytes: int = 64 * 1024 ** 2


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cycle collector held off: a header's JSON makes thousands of small containers, none in a cycle,
    and the collections they trigger (each also walking the older objects, the whole WebUI's in the end) cost
    two to three times the parse itself. Freed by reference counting as usual meanwhile."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def read_header(path: str, limits: Limits = Limits()) -> Header:
    """Parse and validate a safetensors header; raise LoraError naming the first thing wrong."""
    with gc_paused():
        doc, metadata, data_start, data_len = _read_json(path, limits)
        tensors: dict[str, TensorInfo] = {}
        for key, entry in doc.items():
            tensors[key] = _tensor_info(path, key, entry, data_len)
        spans = sorted((t.begin, t.end, k) for k, t in tensors.items() if t.end > t.begin)
        for (b1, e1, k1), (b2, _e2, k2) in zip(spans, spans[1:]):
            if b2 < e1:
                raise LoraError(path, f"tensors {k1!r} and {k2!r} overlap in the file", "the file is corrupt")
        return Header(tensors, metadata, data_start)


def read_listing(path: str, limits: Limits = Limits()) -> tuple[dict[str, list], dict[str, str]]:
    """Each tensor's shape as the header gives it, and ``__metadata__``: what a library listing needs. The size, JSON
    and metadata are checked as in ``read_header``; each tensor's entry only when the file is loaded, since those
    checks cost more than the rest of listing a file, and a library's thousands of headers are read at start-up.
    A shape may be anything JSON holds here."""
    with gc_paused():
        doc, metadata, _data_start, _data_len = _read_json(path, limits)
        try:
            return {key: entry["shape"] for key, entry in doc.items()}, metadata
        except (TypeError, KeyError):  # an entry that is no object or has no shape
            read_header(path, limits)  # raises, naming it
            raise


def _read_json(path: str, limits: Limits) -> tuple[dict, dict[str, str], int, int]:
    """The header's JSON object without ``__metadata__``, the metadata, where the data starts and its length."""
    size = _file_size(path, limits)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraError(path, f"not a safetensors file: only {size} bytes", "the download is incomplete; fetch it again")
        (n,) = struct.unpack("<Q", head)
        if n > limits.max_header_bytes:
            raise LoraError(path, f"header claims {n} bytes, over the {limits.max_header_bytes}-byte limit",
                            "the file is corrupt or not a safetensors file")
        if 8 + n > size:
            raise LoraError(path, f"header of {n} bytes runs past the end of the {size}-byte file",
                            "the file is truncated or not a safetensors file; fetch it again")
        raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraError(path, f"header is not valid JSON ({e.__class__.__name__})",
                        "the file is corrupt or not a safetensors file") from None
    if not isinstance(doc, dict):
        raise LoraError(path, "header is not a JSON object", "the file is corrupt")
    data_len = size - 8 - n
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LoraError(path, "__metadata__ is not a map of strings", "the file is corrupt")
    return doc, dict(metadata), 8 + n, data_len


def _tensor_info(path: str, key: str, entry: object, data_len: int) -> TensorInfo:
    """One header entry, checked; the common valid case in one expression (a header has hundreds of entries), the
    checks one by one only to name what is wrong."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if (type(shape) is list and type(begin) is int and type(end) is int and 0 <= begin <= end <= data_len
                and all(type(d) is int and d >= 0 for d in shape) and math.prod(shape) * DTYPE_SIZES[dtype] == end - begin):
            return TensorInfo(dtype, tuple(shape), begin, end)
    except (TypeError, KeyError, ValueError):
        pass
    if not isinstance(entry, dict):
        raise LoraError(path, f"header entry {key!r} is not an object", "the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise LoraError(path, f"tensor {key!r} has unknown dtype {dtype!r}", "the file is corrupt or from an unsupported tool")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise LoraError(path, f"tensor {key!r} has an invalid shape {shape!r}", "the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise LoraError(path, f"tensor {key!r} has invalid data offsets {offsets!r}", "the file is corrupt")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise LoraError(path, f"tensor {key!r} lies outside the file (bytes {begin}..{end} of {data_len})",
                        "the file is truncated; fetch it again")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_SIZES[dtype] != end - begin:
        raise LoraError(path, f"tensor {key!r}: {dtype}{shape} needs {numel * DTYPE_SIZES[dtype]} bytes but has {end - begin}",
                        "the file is corrupt")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _file_size(path: str, limits: Limits) -> int:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise LoraError(path, f"cannot read the file ({e.strerror or e})", "check that it exists and is readable") from None
    if size > limits.max_file_bytes:
        raise LoraError(path, f"file is {size} bytes, over the {limits.max_file_bytes}-byte limit",
                        "raise \"Refuse network files larger than\" in Settings if you trust this file")
    return size


def _check_dtypes(path: str, header: Header) -> None:
    for key, info in header.tensors.items():
        if info.dtype not in TORCH_DTYPES:
            raise LoraError(path, f"tensor {key!r} has dtype {info.dtype}, which torch here cannot hold", "convert the file to fp16 or fp32")


def load_safetensors(path: str, limits: Limits = Limits()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated tensors and ``__metadata__`` of a safetensors file, on the CPU. Each tensor is read straight
    into its own memory, in file order: loading holds nothing but the tensors it returns."""
    header = read_header(path, limits)
    _check_dtypes(path, header)
    tensors = {}
    with open(path, "rb", buffering=0) as f:
        for key, info in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
            raw = torch.empty(info.end - info.begin, dtype=torch.uint8)
            f.seek(header.data_start + info.begin)
            if _read_into(f, memoryview(raw.numpy())) != info.end - info.begin:
                raise LoraError(path, f"the file ended inside tensor {key!r}", "the file was changed while being read; try again")
            tensors[key] = raw.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
    return {key: tensors[key] for key in header.tensors}, header.metadata


def _read_into(f, view: memoryview) -> int:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def map_safetensors(path: str, limits: Limits = Limits()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated tensors of a safetensors file as views of a private memory map: nothing is read until a tensor
    is used, and writes to a tensor stay in this process (copy-on-write), never reach the file. For checkpoints,
    which are read once and let go; a network that stays cached is read with ``load_safetensors``."""
    header = read_header(path, limits)
    _check_dtypes(path, header)
    size = header.data_start + max((info.end for info in header.tensors.values()), default=0)
    try:
        data = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(path, False, size))
    except RuntimeError:
        raise LoraError(path, "the file is shorter than its header says", "the file was changed while being read; try again") from None
    tensors = {}
    for key, info in header.tensors.items():
        raw = data[header.data_start + info.begin:header.data_start + info.end]
        if (header.data_start + info.begin) % DTYPE_SIZES[info.dtype]:
            raw = raw.clone()  # an unaligned tensor cannot be viewed in place; it gets memory of its own
        tensors[key] = raw.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
    return tensors, header.metadata


def save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The safetensors layout the ``safetensors`` library writes (same bytes), streamed tensor by tensor: no
    second copy of the data is made, so a checkpoint is written with the memory it already holds."""
    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-WRITE_ORDER.index(names[tensors[k].dtype]), k))
    doc: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        doc[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in order:
            t = tensors[key].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def load_pickled(path: str, limits: Limits = Limits(), mapped: bool = False) -> dict[str, torch.Tensor]:
    """A legacy .pt/.ckpt/.bin state dict through the weights-only unpickler, never the full one; ``mapped``:
    a zip-format file's tensors stay in a private memory map until used (as ``map_safetensors``)."""
    _file_size(path, limits)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped and zipfile.is_zipfile(path))
    except Exception as e:  # the weights-only unpickler refuses anything that could run code
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        if zipfile.is_zipfile(path) or "weights_only" in str(e) or "Unsupported" in str(e):
            raise LoraError(path, f"refused to unpickle: {reason}",
                            "this file holds objects besides tensors; use a .safetensors version") from None
        raise LoraError(path, f"not a readable torch file ({reason})", "the file is corrupt or truncated") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraError(path, f"holds a {type(obj).__name__}, not a state dict", "this is not a network file")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise LoraError(path, "holds no tensors", "this is not a network file")
    return tensors


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``, in one pass without temporaries the size of ``t`` (numpy's isfinite; torch's
    builds several and is slow on CPUs in half precision). Types numpy lacks are widened first."""
    t = t.detach().cpu()
    if t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()
    return bool(np.isfinite(t.numpy()).all())


def read_state_dict(path: str, limits: Limits = Limits(), mapped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of any supported file, by suffix; ``mapped``: in a private memory map, read as used."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return map_safetensors(path, limits) if mapped else load_safetensors(path, limits)
    if suffix in SUFFIXES:
        return load_pickled(path, limits, mapped), {}
    raise LoraError(path, f"unsupported file type {suffix or '(none)'!r}", "use .safetensors, .pt, .ckpt or .bin")
