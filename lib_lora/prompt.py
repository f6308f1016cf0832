"""``<lora:…>`` tokens: every form the WebUI's built-in accepts, plus named ``lbw=``/``start=``/``stop=``.

Parsing never raises out of this module's public functions for user text; bad tokens become messages.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

TOKEN = re.compile(r"<(lora|lyco):([^>]+)>")
MAX_WEIGHT = 100.0


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


def parse_items(items: list[str]) -> Request:
    """A Request from the colon-separated items of one token (``ExtraNetworkParams.items``)."""
    positional, named = [], {}
    for item in items:
        item = str(item)
        key, eq, value = item.partition("=")
        if eq and re.fullmatch(r"[A-Za-z_]+", key.strip()):
            named[key.strip().lower()] = value.strip()
        else:
            positional.append(item)
    if not positional:
        raise PromptError("a network token needs a name, e.g. <lora:name:0.8>")
    unknown = set(named) - {"te", "unet", "dyn", "lbw", "start", "stop"}
    if unknown:
        raise PromptError(f"unknown option {sorted(unknown)[0]!r} (known: te, unet, dyn, lbw, start, stop)")
    name = check_name(positional[0])
    te = _number(positional[1], "weight") if len(positional) > 1 and positional[1].strip() else None
    unet = _number(positional[2], "unet weight") if len(positional) > 2 and positional[2].strip() else None
    dyn = _dyn(positional[3]) if len(positional) > 3 and positional[3].strip() else None
    if len(positional) > 4:
        raise PromptError(f"too many values in <lora:{':'.join(items)}> (name, te, unet, dyn at most)")
    te = _number(named["te"], "te") if "te" in named else te
    unet = _number(named["unet"], "unet") if "unet" in named else unet
    dyn = _dyn(named["dyn"]) if "dyn" in named else dyn
    start = _step(named["start"], "start") if "start" in named else None
    stop = _step(named["stop"], "stop") if "stop" in named else None
    if start is not None and stop is not None and stop <= start and not (stop < 1 <= start):
        raise PromptError(f"stop ({named['stop']}) must come after start ({named['start']})")
    lbw = named.get("lbw") or None
    if lbw is not None:
        from .blocks import BlockWeights
        try:
            BlockWeights(lbw)
        except ValueError as e:
            raise PromptError(str(e)) from None
    if unet is None and te is not None and "unet" not in named:
        unet = te
    return Request(name, te, unet, dyn, lbw, start, stop, "<lora:" + ":".join(items) + ">")


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


def resolve_step(value: float | None, steps: int) -> int | None:
    """A value below 1 is a fraction of the steps, anything else a step number."""
    if value is None:
        return None
    if 0 < value < 1:
        return max(1, round(value * steps)) if steps else 0
    return int(value)
