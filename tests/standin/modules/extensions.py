"""Mirrors modules/extensions.py: ``extensions``, the installed extensions (each with its ``path``)."""
extensions: list = []
