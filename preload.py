"""``--lora-dir`` (the WebUI's own option: defined here only when the built-in Lora is absent)."""
import os

from modules import paths


def preload(parser):
    if "--lora-dir" not in parser._option_string_actions:
        parser.add_argument("--lora-dir", type=str, default=os.path.join(paths.models_path, "Lora"),
                            help="Path to directory with Lora networks.")
