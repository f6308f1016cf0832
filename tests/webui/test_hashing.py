"""Hash lookups in a library whose files are not hashed yet: a prompt naming an unknown hash and a pasted infotext
answer at once with what is known (the answer names the files still being hashed), one background thread hashes
the rest, and the hashes land in the WebUI's own cache in its format, where the built-in Lora finds them."""
from __future__ import annotations

import base64
import io
import json
import pathlib
import struct
import subprocess
import time

import pytest
from safetensors.torch import load_file, save_file

import lib_lora.hashes

BIG = 1024 ** 3  # sparse: no disk, but hashing each takes seconds


@pytest.fixture(scope="module")
def library(server, webui, lora_dir):
    """Three 1 GB files no one has hashed, and ``renamed``: kohya_b's tensors changed a little (a hash no cache
    knows), saved under a new name."""
    added = []
    for i in range(3):
        path = lora_dir / f"big_{i}.safetensors"
        raw = json.dumps({"data": {"dtype": "U8", "shape": [BIG], "data_offsets": [0, BIG]}}).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + bytes([i]))
            f.truncate(8 + len(raw) + BIG)
        added.append(path)
    tensors = load_file(str(lora_dir / "kohya_b.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 1.001
    save_file(tensors, str(lora_dir / "renamed.safetensors"), {"ss_network_module": "networks.lora"})
    added.append(lora_dir / "renamed.safetensors")
    assert webui.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    yield lora_dir / "renamed.safetensors"
    for path in added:
        path.unlink(missing_ok=True)
    server.ensure("ours").call("POST", "/sdapi/v1/refresh-loras")


def png_with(infotext: str) -> str:
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def pasted(webui, prompt: str, hashes: str) -> str:
    infotext = f'{prompt}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Lora hashes: "{hashes}"'
    status, res = webui.call("POST", "/sdapi/v1/png-info", {"image": png_with(infotext)})
    assert status == 200, res
    return res["parameters"]["Prompt"]


def test_unknown_hashes_answer_at_once_and_name_what_is_being_hashed(webui, library):
    renamed_hash = lib_lora.hashes.addnet_hash(str(library))[:12]
    # the paste starts the background hashing and answers with the hashes known now: the old name stays
    assert pasted(webui, "a cat <lora:gone:0.5>", f"gone: {renamed_hash}") == "a cat <lora:gone:0.5>"
    _, info = webui.txt2img("a cat <lora:0123456789ab:1>")
    errors = info["extra_generation_params"]["Lora errors"]
    assert "no network with hash 0123456789ab is known yet" in errors and "still being hashed" in errors, errors
    assert "big_" in errors, "the answer names the files still being hashed"

    deadline = time.monotonic() + 600
    while (prompt := pasted(webui, "a cat <lora:gone:0.5>", f"gone: {renamed_hash}")) == "a cat <lora:gone:0.5>":
        assert time.monotonic() < deadline, "the background hashing never finished"
        time.sleep(2)
    assert prompt == "a cat <lora:renamed:0.5>"
    _, info = webui.txt2img(f"a cat <lora:{renamed_hash}:1>")
    assert "Lora errors" not in info["extra_generation_params"] and renamed_hash in info["infotexts"][0]


def test_hashes_go_to_the_webui_cache_for_the_builtin(server, webui, library):
    """Read with the WebUI's own cache module (diskcache in v1.10), then used by the built-in Lora unchanged."""
    bed = pathlib.Path(webui.bed)
    code = ("import json, sys; sys.path.insert(0, 'webui'); import os; os.chdir('webui'); from modules import cache; "
            "print(json.dumps(cache.cache('hashes-addnet').get('lora/renamed')))")
    out = subprocess.run([str(bed / "venv" / "bin" / "python"), "-c", code], cwd=bed, capture_output=True, text=True,
                         timeout=120)
    cached = json.loads(out.stdout.strip().splitlines()[-1])
    assert cached == {"mtime": library.stat().st_mtime, "sha256": lib_lora.hashes.addnet_hash(str(library))}

    builtin = server.ensure("builtin")
    _, info = builtin.txt2img("a cat <lora:renamed:0.5>")
    assert f"renamed: {cached['sha256'][:12]}" in info["infotexts"][0]
    assert f"Calculating sha256 for {library}" not in builtin.log(), "the built-in computed the hash again"
    server.ensure("ours")
