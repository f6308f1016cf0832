"""A thin stand-in for the WebUI's ``modules`` package, for fast hook tests only.

Each file mirrors the named file of AUTOMATIC1111 v1.10.1 with just what the hook touches; the real
WebUI is exercised by tests/webui.
"""
