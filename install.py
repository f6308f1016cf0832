"""A1111 runs this before launch. The extension needs only torch, safetensors, numpy, pillow and
gradio, which the WebUI already provides, so it installs nothing (and never touches torch)."""
