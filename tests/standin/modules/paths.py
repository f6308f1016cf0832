"""Mirrors modules/paths.py: where models and data live."""
models_path = "/nonexistent/models"
data_path = "/nonexistent"
