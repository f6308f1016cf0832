"""The user-metadata sidecar (name.json): round trip, unknown keys, corrupt files, crashes mid-write."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lib_lora import sidecar
from lib_lora.errors import LoraError

VALUES = {"description": "Ink wash style", "activation text": "inkstyle, monochrome", "preferred weight": 0.7,
          "negative text": "color", "notes": "épreuve — unicode kept", "sd version": "SD1"}


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "ink.safetensors"
    path.write_bytes(b"")
    return str(path)


def test_values_written_are_read_back(net):
    sidecar.write(net, VALUES)
    assert sidecar.read(net) == VALUES
    assert json.loads(open(sidecar.sidecar_path(net), encoding="utf8").read()) == VALUES  # plain JSON, the WebUI's keys



def test_preferred_weight_one_rule_for_cards_and_generation():
    """A finite weight within a prompt's ±100, negative ones too; anything else is unset (0: the default)."""
    assert sidecar.preferred_weight({"preferred weight": 0.7}) == 0.7
    assert sidecar.preferred_weight({"preferred weight": "-0.5"}) == -0.5
    assert sidecar.preferred_weight({"preferred weight": -100}) == -100
    for unset in ({}, {"preferred weight": "junk"}, {"preferred weight": None}, {"preferred weight": 0},
                  {"preferred weight": 100.5}, {"preferred weight": "nan"}, {"preferred weight": "-inf"},
                  {"preferred weight": [1]}):
        assert sidecar.preferred_weight(unset) == 0.0

def test_unknown_keys_survive(net):
    with open(sidecar.sidecar_path(net), "w", encoding="utf8") as f:
        json.dump({"description": "old", "civitai id": 1234, "other tool": {"x": [1, 2]}}, f)
    sidecar.write(net, VALUES)
    data = sidecar.read(net)
    assert data["civitai id"] == 1234 and data["other tool"] == {"x": [1, 2]}
    assert data["description"] == "Ink wash style"


def test_corrupt_file_is_reported_and_kept_aside(net):
    path = sidecar.sidecar_path(net)
    with open(path, "w", encoding="utf8") as f:
        f.write('{"description": "half a file')
    with pytest.raises(LoraError, match="unreadable"):
        sidecar.read(net)
    data, problem = sidecar.read_or_empty(net)
    assert data == {} and "unreadable" in problem
    assert open(path, encoding="utf8").read() == '{"description": "half a file', "reading must not touch it"
    sidecar.write(net, VALUES)
    assert open(path + ".bad", encoding="utf8").read() == '{"description": "half a file'
    assert sidecar.read(net) == VALUES


def test_failed_write_leaves_old_file_and_no_temp(net, monkeypatch):
    sidecar.write(net, {"description": "old"})
    before = open(sidecar.sidecar_path(net), "rb").read()

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        sidecar.write(net, VALUES)
    assert open(sidecar.sidecar_path(net), "rb").read() == before
    assert sorted(os.listdir(os.path.dirname(net))) == ["ink.json", "ink.safetensors"]


def test_crash_mid_write_leaves_old_file_intact(net):
    """A process killed after writing part of the new file (before the rename) changes nothing."""
    sidecar.write(net, {"description": "old", "keep": True})
    before = open(sidecar.sidecar_path(net), "rb").read()
    child = f"""
import os, sys
sys.path.insert(0, {os.getcwd()!r})
from lib_lora import sidecar
real_fsync = os.fsync
def crash(fd):
    os.write(fd, b'{{"partial')
    os._exit(9)
os.fsync = crash
sidecar.write({net!r}, {{"description": "new " * 10000}})
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", child], cwd=root, timeout=60)
    assert done.returncode == 9
    assert open(sidecar.sidecar_path(net), "rb").read() == before
    assert sidecar.read(net) == {"description": "old", "keep": True}
