"""Mirrors modules/shared.py: opts, cmd_opts and the loaded model."""
from types import SimpleNamespace

opts = SimpleNamespace()
cmd_opts = SimpleNamespace(lora_dir=None)
sd_model = None
