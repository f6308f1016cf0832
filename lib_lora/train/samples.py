"""Sample prompts, one per line with kohya's options: ``a cat --n blurry --w 768 --h 512 --s 28 --l 6.5 --d 42``
(negative prompt, width, height, steps, CFG scale, seed, and ``--ss`` sampler). Options not given are left to
the sampler's defaults."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import LoraError

_OPTIONS = (  # kohya's line_to_prompt_dict: option pattern → field, type
    (re.compile(r"w (\d+)", re.I), "width", int),
    (re.compile(r"h (\d+)", re.I), "height", int),
    (re.compile(r"d (\d+)", re.I), "seed", int),
    (re.compile(r"s (\d+)", re.I), "steps", int),
    (re.compile(r"l ([\d.]+)", re.I), "cfg_scale", float),
    (re.compile(r"n (.+)", re.I), "negative_prompt", str),
    (re.compile(r"ss (.+)", re.I), "sampler", str),
)


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None


def parse_line(line: str) -> SamplePrompt:
    """One prompt line: the text before the first `` --`` is the prompt; each `` --x value`` sets an option.
    Steps are clamped to 1..1000 and sizes rounded down to multiples of 8, as kohya does."""
    parts = line.strip().split(" --")
    sample = SamplePrompt(parts[0].strip())
    for part in parts[1:]:
        for pattern, name, kind in _OPTIONS:
            m = pattern.fullmatch(part.strip())
            if m:
                try:
                    setattr(sample, name, kind(m[1].strip()))
                except ValueError:
                    raise LoraError(None, f"sample prompt option --{part.strip()} has a bad value",
                                    "e.g. --w 512 --h 768 --s 20 --l 7 --d 1 --n text") from None
                break
    if sample.steps is not None:
        sample.steps = max(1, min(1000, sample.steps))
    for name in ("width", "height"):
        value = getattr(sample, name)
        if value is not None:
            setattr(sample, name, max(64, value - value % 8))
    return sample


def read_prompts(path: str) -> list[SamplePrompt]:
    """The prompts of a file; blank lines and lines starting with # are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as e:
        raise LoraError(path, f"cannot read the sample prompts ({e.strerror or e})", "check sample_prompts") from None
    return [parse_line(line) for line in lines]
