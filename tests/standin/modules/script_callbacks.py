"""Mirrors modules/script_callbacks.py: callback registration (the test calls them)."""
from collections import defaultdict

callbacks = defaultdict(list)


def _adder(name):
    def add(callback, *, name_=None):
        callbacks[name].append(callback)
    return add


on_before_ui = _adder("before_ui")
on_model_loaded = _adder("model_loaded")
on_cfg_denoiser = _adder("cfg_denoiser")
on_infotext_pasted = _adder("infotext_pasted")
on_app_started = _adder("app_started")
on_ui_settings = _adder("ui_settings")


class CFGDenoiserParams:
    """Mirrors the fields of the real CFGDenoiserParams the hook reads."""

    def __init__(self, sampling_step, total_sampling_steps, denoiser):
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.denoiser = denoiser
