"""``<lora:…>`` tokens: every form the WebUI's built-in accepts, and sd-webui-lora-block-weight's (LBW's).

Named options: ``te=``, ``unet=``, ``dyn=``, ``lbw=`` (block weights: a preset or a vector), ``lbwe=`` (an
elemental preset), ``x=`` (the value of a vector's ``X`` entries), ``start=``/``stop=`` and ``step=A-B``.
LBW's positional form ``<lora:name:w:PRESET>`` (or a vector there) takes block weights where the built-in
has the UNet weight, followed by an ``X`` value or an elemental preset.
Parsing never raises out of this module's public functions for user text; bad tokens become messages.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from .block_presets import XYZ, ZYX, inverted
from .blocks import LENGTHS

TOKEN = re.compile(r"<(lora|lyco):([^>]+)>")
MAX_WEIGHT = 100.0
OPTIONS = ("te", "unet", "dyn", "lbw", "lbwe", "x", "start", "stop", "step")


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class Request:
    """One network asked for in a prompt; ``te=None`` means "the card's preferred weight, else 1"."""

    name: str
    te: float | None = None
    unet: float | None = None
    dyn: int | None = None
    lbw: str | None = None
    start: float | None = None
    stop: float | None = None
    lbwe: str | None = None
    x: float | None = None
    text: str = ""


def check_name(name: str) -> str:
    """A network name as typed; refuse anything that could reach outside the Lora folders."""
    name = name.strip()
    if not name:
        raise PromptError("a network token needs a name, e.g. <lora:name:0.8>")
    if "\x00" in name or any(ord(c) < 32 for c in name):
        raise PromptError(f"network name {name!r} contains control characters")
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise PromptError(f"network name {name!r} is not a name inside the Lora folder")
    return name


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be a number, not {text!r}") from None
    if not math.isfinite(v) or abs(v) > MAX_WEIGHT:
        raise PromptError(f"{what} must be a finite number within ±{MAX_WEIGHT:g}, not {text!r}")
    return v


def _dyn(text: str) -> int:
    v = _number(text, "dyn")
    if v != int(v) or v < 1:
        raise PromptError(f"dyn must be a positive whole number, not {text!r}")
    return int(v)


def _step(text: str, what: str) -> float:
    v = _number(text, what)
    if v < 0:
        raise PromptError(f"{what} must not be negative, not {text!r}")
    return v


def _named(item: str) -> tuple[str, str] | None:
    key, eq, value = item.partition("=")
    return (key.strip().lower(), value.strip()) if eq and re.fullmatch(r"[A-Za-z_]+", key.strip()) else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _block_vector(text: str) -> str:
    """A vector's syntax is checked here; preset names only when the presets are known (activation)."""
    if "," in text:
        n = text.count(",") + 1
        if n not in LENGTHS:
            raise PromptError(f"a block-weight vector has 12, 17, 20 or 26 entries, not {n}: {text!r}")
    return text


def _step_range(text: str) -> tuple[float | None, float | None]:
    ends = text.split("-")
    if len(ends) != 2:
        raise PromptError(f"step= takes FIRST-LAST, e.g. step=5-10, not {text!r}")
    return tuple(_step(e, "step") if e.strip() else None for e in ends)


def parse_items(items: list[str]) -> Request:
    """A Request from the colon-separated items of one token (``ExtraNetworkParams.items``)."""
    positional, named = [], {}
    for item in items:
        item = str(item)
        pair = _named(item)
        if pair:
            named[pair[0]] = pair[1]
        else:
            positional.append(item)
    if not positional:
        raise PromptError("a network token needs a name, e.g. <lora:name:0.8>")
    unknown = set(named) - set(OPTIONS)
    if unknown:
        raise PromptError(f"unknown option {sorted(unknown)[0]!r} (known: {', '.join(OPTIONS)})")
    name = check_name(positional[0])
    given = [p.strip() for p in positional[1:]]
    te = _number(given[0], "weight") if given and given[0] else None
    unet = dyn = lbw = lbwe = x = None
    if len(given) > 1 and given[1] and not _is_number(given[1]):  # LBW: <lora:name:w:PRESET[:x or lbwe]>
        lbw = _block_vector(given[1])
        if len(given) > 2 and given[2]:
            if _is_number(given[2]):
                x = _number(given[2], "x")
            else:
                lbwe = given[2]
        if len(given) > 3:
            raise PromptError(f"too many values in <lora:{':'.join(items)}> (name, weight, block weights, x at most)")
    else:
        unet = _number(given[1], "unet weight") if len(given) > 1 and given[1] else None
        dyn = _dyn(given[2]) if len(given) > 2 and given[2] else None
        if len(given) > 3:
            raise PromptError(f"too many values in <lora:{':'.join(items)}> (name, te, unet, dyn at most)")
    te = _number(named["te"], "te") if "te" in named else te
    unet = _number(named["unet"], "unet") if "unet" in named else unet
    dyn = _dyn(named["dyn"]) if "dyn" in named else dyn
    lbw = _block_vector(named["lbw"]) if named.get("lbw") else lbw
    lbwe = named["lbwe"] if named.get("lbwe") else lbwe
    x = _number(named["x"], "x") if "x" in named else x
    start = _step(named["start"], "start") if "start" in named else None
    stop = _step(named["stop"], "stop") if "stop" in named else None
    if "step" in named:
        if "start" in named or "stop" in named:
            raise PromptError("write step=FIRST-LAST or start=/stop=, not both")
        start, stop = _step_range(named["step"])
    if start is not None and stop is not None and stop <= start and not (stop < 1 <= start):
        raise PromptError(f"stop ({stop:g}) must come after start ({start:g})")
    if unet is None and te is not None and "unet" not in named:
        unet = te
    return Request(name, te, unet, dyn, lbw, start, stop, lbwe, x, "<lora:" + ":".join(items) + ">")


def parse_prompt(text: str) -> tuple[str, list[Request], list[str]]:
    """Strip ``<lora:…>``/``<lyco:…>`` tokens from ``text``: (clean text, requests, messages)."""
    requests, messages = [], []

    def found(m: re.Match) -> str:
        try:
            requests.append(parse_items(m.group(2).split(":")))
        except PromptError as e:
            messages.append(f"{m.group(0)}: {e}")
        return ""

    return TOKEN.sub(found, text or ""), requests, messages


def rewrite_tokens(text: str, change: Callable[[list[str]], list[str]]) -> tuple[str, int]:
    """``text`` with each token's items replaced by ``change(items)``, and how many tokens it has."""
    count = 0

    def sub(m: re.Match) -> str:
        nonlocal count
        count += 1
        return f"<{m.group(1)}:{':'.join(change(m.group(2).split(':')))}>"

    return TOKEN.sub(sub, text or ""), count


def with_weight(items: list[str], weight: str) -> list[str]:
    """A token's items with ``weight`` for the text encoder and the UNet; block weights and options kept."""
    out = list(items)
    positional = [i for i, item in enumerate(out) if not _named(item)]
    if len(positional) > 1:
        out[positional[1]] = weight
    elif positional and not any((_named(item) or ("",))[0] == "te" for item in out):
        out.insert(positional[0] + 1, weight)
    if len(positional) > 2 and _is_number(out[positional[2]]):
        out[positional[2]] = weight
    for i, item in enumerate(out):
        if (_named(item) or ("",))[0] in ("te", "unet"):
            out[i] = f"{item.partition('=')[0]}={weight}"
    return out


def with_block_weights(items: list[str], spec: str) -> list[str]:
    """A token's items with block weights ``spec`` where it has them (``lbw=`` or LBW's positional place), else
    with ``lbw=spec`` added."""
    out = list(items)
    for i, item in enumerate(out):
        if (_named(item) or ("",))[0] == "lbw":
            out[i] = f"{item.partition('=')[0]}={spec}"
            return out
    positional = [i for i, item in enumerate(out) if not _named(item)]
    if len(positional) > 2 and out[positional[2]].strip() and not _is_number(out[positional[2]]):
        out[positional[2]] = spec
        return out
    return out + [f"lbw={spec}"]


def with_xyz_vectors(text: str, vector: str) -> tuple[str, int]:
    """LBW's XYZ plot: ``text`` with the networks written ``lbw=XYZ`` given ``vector`` and those written ``lbw=ZYX``
    its inverse; and how many there were."""
    vectors = {XYZ: vector, ZYX: inverted(vector)}
    found = 0

    def change(items: list[str]) -> list[str]:
        nonlocal found
        try:
            spec = parse_items(items).lbw
        except PromptError:
            return items
        if spec not in vectors:
            return items
        found += 1
        return with_block_weights(items, vectors[spec])

    return rewrite_tokens(text, change)[0], found


def resolve_step(value: float | None, steps: int) -> int | None:
    """A value below 1 is a fraction of the steps, anything else a step number."""
    if value is None:
        return None
    if 0 < value < 1:
        return max(1, round(value * steps)) if steps else 0
    return int(value)
