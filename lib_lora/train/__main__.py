"""``python -m lib_lora.train --config run.toml [--option value ...]``.

The engine loads no checkpoints itself, so the model comes from ``model_factory = "module:function"``: a
function taking the TrainConfig and returning a ModelBundle (the WebUI tab passes its loaded model instead).
Ctrl-C once stops at the next step and saves a resumable state; twice aborts. Under ``torchrun`` or
``accelerate launch`` every process runs this and takes its share of each step (see ``distributed``).
"""
from __future__ import annotations

import importlib
import signal
import sys

from ..errors import LoraError
from .config import dumps, from_args
from .distributed import Distributed
from .loop import Trainer, progress_line
from .model import ModelBundle


def load_factory(spec: str):
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise LoraError(None, f"model_factory {spec!r} is not 'module:function'", "e.g. my_models:load_sd15")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise LoraError(None, f"model_factory {spec!r} cannot be loaded ({e})", "check PYTHONPATH and the name") from None


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, ns = from_args(argv)
        if getattr(ns, "print_config", False):
            print(dumps(cfg))
            return 0
        if not cfg.model_factory:
            raise LoraError(None, "no model_factory given", "set model_factory = 'module:function' returning a ModelBundle")
        dist = Distributed.from_env()
        bundle = load_factory(cfg.model_factory)(cfg)
        if not isinstance(bundle, ModelBundle):
            raise LoraError(None, f"model_factory returned {type(bundle).__name__}, not a ModelBundle", "fix the factory")
        trainer = Trainer(cfg, bundle, log_fn=lambda m: print("\n" + m, file=sys.stderr, flush=True), dist=dist)

        def on_sigint(_sig, _frame):
            if trainer.cancelled:
                raise KeyboardInterrupt
            print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)
            trainer.cancel()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            result = trainer.run(lambda p: print("\r" + progress_line(p).ljust(100), end="", flush=True))
        finally:
            signal.signal(signal.SIGINT, previous)
    except LoraError as e:
        print(f"\nerror: {e.message}", file=sys.stderr)
        return 2
    if not dist.main:
        return 0
    print()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{'cancelled' if result.cancelled else 'finished'} at step {result.step}: {result.output}")
    if result.state:
        print(f"state: {result.state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
