"""Mirrors modules/devices.py: the flag the WebUI sets when it stores weights in FP8 (sd_models.load_model_weights)."""
fp8 = False
