"""``python -m lib_lora inspect|resize|merge|extract ...``: the same engine functions the WebUI uses.

``inspect FILE [--json]`` prints the summary the WebUI shows; ``resize``, ``merge`` and ``extract`` write kohya
LoRA/LoCon files (or, with ``merge --into-checkpoint``, a checkpoint) through ``lib_lora.tools``."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import LoraError
from .network import load
from .summary import file_summary
from .tools import (RankRule, as_modules, extract, merge_into_checkpoint, merge_networks, read_checkpoint, resize,
                    save_checkpoint, save_network)
from .tools.lowrank import DYNAMIC
from .train.metadata import SAVE_DTYPES


def _rank_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=8, help="rank of linear and 1x1 layers (default 8)")
    p.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 convs (default: --rank; 0 leaves them out)")
    p.add_argument("--dynamic", choices=DYNAMIC, help="choose each module's rank by its singular values, up to --rank")
    p.add_argument("--dynamic-param", type=float, help="sv_ratio: largest/smallest kept; sv_fro, sv_cumulative: fraction")
    p.add_argument("--precision", choices=tuple(SAVE_DTYPES), default="fp16", help="dtype of the file (default fp16)")


def _rule(args) -> RankRule:
    return RankRule(args.rank, args.conv_rank, args.dynamic, args.dynamic_param)


def _weighted(spec: str) -> tuple[str, float]:
    """``file[:weight]`` (a Windows drive colon is not a weight)."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path or "\\" in weight or "/" in weight:
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise LoraError(path, f"weight {weight!r} is not a number", "write networks as file.safetensors:0.7") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_lora")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise a network file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("resize", help="a network at another rank, as a kohya LoRA/LoCon file")
    p.add_argument("file")
    p.add_argument("output")
    p.add_argument("--model", required=True, help="the base checkpoint (layer shapes; weights for DoRA/IA3/OFT)")
    _rank_options(p)
    p = sub.add_parser("merge", help="networks with weights into one network, or into a checkpoint")
    p.add_argument("output")
    p.add_argument("networks", nargs="+", metavar="FILE[:WEIGHT]")
    p.add_argument("--model", required=True, help="the base checkpoint")
    p.add_argument("--into-checkpoint", action="store_true", help="write the checkpoint with the networks merged in")
    _rank_options(p)
    p = sub.add_parser("extract", help="a network from a fine-tuned checkpoint and its base")
    p.add_argument("output")
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True)
    p.add_argument("--min-diff", type=float, default=0.01, help="leave out a text encoder that changed less")
    _rank_options(p)
    p.set_defaults(conv_rank=0)
    return parser


def _inspect(args) -> None:
    info = file_summary(args.file)
    if args.json:
        print(json.dumps(info, indent=None, sort_keys=False))
        return
    for key in ("format", "base_model", "kinds", "modules", "rank", "alpha"):
        print(f"{key:11} {info[key]}")
    for key, value in info["hashes"].items():
        print(f"{key:11} {value}")
    for key, value in info["metadata"].items():
        if not key.startswith("ss_tag_frequency"):
            print(f"{key:11} {value[:120]}")


def _tool(args) -> None:
    if args.command == "extract":
        base, tuned = (as_modules(read_checkpoint(p)[0]) for p in (args.base, args.tuned))
        result = extract(base, tuned, _rule(args), args.min_diff, args.precision)
    else:
        tensors, metadata = read_checkpoint(args.model)
        if args.command == "resize":
            result = resize(load(args.file), as_modules(tensors), _rule(args), args.precision)
        else:
            items = [(load(path), weight) for path, weight in map(_weighted, args.networks)]
            if args.into_checkpoint:
                res = merge_into_checkpoint(items, tensors)
                save_checkpoint(args.output, tensors, metadata)
                print(f"{len(res.matched)} layers merged into the checkpoint: {args.output}")
                for line in res.skipped:
                    print(f"skipped: {line}", file=sys.stderr)
                return
            result = merge_networks(items, as_modules(tensors), _rule(args), args.precision)
    save_network(args.output, result)
    print(f"{result.summary()}: {args.output}")
    for line in result.skipped:
        print(f"skipped: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _inspect(args) if args.command == "inspect" else _tool(args)
    except LoraError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
