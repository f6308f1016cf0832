"""Mirrors modules/scripts.py: ``scripts_data``, the loaded script files (each with ``path`` and ``module``)."""
scripts_data: list = []
