"""Thin glue between the WebUI's ``modules`` API and the engine; nothing here decides anything."""
