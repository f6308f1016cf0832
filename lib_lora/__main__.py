"""``python -m lib_lora inspect FILE [--json]``: the same summary the WebUI shows."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import LoraError
from .inspect import inspect_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_lora")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="summarise a network file")
    p_inspect.add_argument("file")
    p_inspect.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        info = inspect_file(args.file)
    except LoraError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=None, sort_keys=False))
    else:
        for key in ("format", "base_model", "kinds", "modules", "rank", "alpha"):
            print(f"{key:11} {info[key]}")
        for key, value in info["hashes"].items():
            print(f"{key:11} {value}")
        for key, value in info["metadata"].items():
            if not key.startswith("ss_tag_frequency"):
                print(f"{key:11} {value[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
