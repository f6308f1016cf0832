"""``--lora-dir``: the WebUI's own option. The built-in Lora defines it in its preload, which runs even
when that extension is disabled (and after ours), so it is added here only when the built-in is absent."""
import os

from modules import paths


def preload(parser):
    builtin = os.path.join(paths.script_path, "extensions-builtin", "Lora", "preload.py")
    if not os.path.exists(builtin) and "--lora-dir" not in parser._option_string_actions:
        parser.add_argument("--lora-dir", type=str, default=os.path.join(paths.models_path, "Lora"),
                            help="Path to directory with Lora networks.")
