"""``python -m lib_lora.train --pretrained_model_name_or_path model.safetensors --train_data_dir DIR [...]``.

The model is built from the checkpoint (``loader``: the WebUI's ldm/sgm code, no download), or comes from
``model_factory = "module:function"``: a function taking the TrainConfig and returning a ModelBundle (the
WebUI tab passes its loaded model instead). Options come from ``--config`` / kohya's ``--config_file`` TOML
and flags, with kohya sd-scripts' names.
Ctrl-C once stops at the next step and saves a resumable state; twice aborts. Under ``torchrun`` or
``accelerate launch`` every process runs this and takes its share of each step (see ``distributed``).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

from ..errors import LoraError
from ..sidecar import atomic_write_bytes
from .config import TrainConfig, dumps, from_args, to_kohya_toml
from .distributed import Distributed
from .loader import load_checkpoint
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


def make_bundle(cfg: TrainConfig) -> ModelBundle:
    """The run's model: the factory's, else the checkpoint's."""
    if cfg.model_factory:
        bundle = load_factory(cfg.model_factory)(cfg)
        if not isinstance(bundle, ModelBundle):
            raise LoraError(None, f"model_factory returned {type(bundle).__name__}, not a ModelBundle", "fix the factory")
        return bundle
    if not cfg.pretrained_model_name_or_path:
        raise LoraError(None, "no model to train", "give --pretrained_model_name_or_path model.safetensors "
                        "(or a model_factory)")
    return load_checkpoint(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))


def write_config(cfg: TrainConfig, path: str | None) -> int:
    """kohya's ``--output_config``: the options as a TOML at ``--config_file`` (never over an existing file)."""
    if not path:
        raise LoraError(None, "--output_config needs --config_file", "name the TOML file to write")
    path = path if path.endswith(".toml") else path + ".toml"
    if os.path.exists(path):
        raise LoraError(path, "already exists", "choose a new file name")
    atomic_write_bytes(path, to_kohya_toml(cfg).encode())
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, ns = from_args(argv)
        for note in ns.notes:
            print(f"note: {note}", file=sys.stderr)
        if getattr(ns, "print_config", False):
            print(dumps(cfg))
            return 0
        if getattr(ns, "output_config", False):
            return write_config(cfg, getattr(ns, "config_file", None))
        dist = Distributed.from_env()
        bundle = make_bundle(cfg)
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
