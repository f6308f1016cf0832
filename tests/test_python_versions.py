"""The extension must load on Python 3.10 (the WebUI's own version, the only one it accepts on Windows)
as on 3.11: every file compiles under a 3.10 interpreter, and every engine module imports under the
interpreter running this test (.ci/run runs the engine tests under both)."""
from __future__ import annotations

import glob
import importlib
import os
import pathlib
import pkgutil
import shutil
import subprocess
import sys

import pytest

import lib_lora

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(str(p) for d in ("lib_lora", "scripts") for p in (ROOT / d).rglob("*.py")) + \
    [str(ROOT / "install.py"), str(ROOT / "preload.py")]

COMPILE_ALL = """
import sys
bad = []
for path in sys.argv[1:]:
    try:
        compile(open(path, encoding="utf-8").read(), path, "exec", dont_inherit=True)
    except SyntaxError as e:
        bad.append(f"{path}:{e.lineno}: {e.msg}")
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def python310() -> str | None:
    """A Python 3.10: the one running the tests, the WebUI test bed's venv, pyenv's, or python3.10 on PATH."""
    if sys.version_info[:2] == (3, 10):
        return sys.executable
    bed = os.environ.get("WEBUI_TESTBED") or os.path.expanduser("~/.cache/sd-webui-testbed")
    candidates = [os.path.join(bed, "venv", "bin", "python")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python3.10")), reverse=True)
    candidates += [shutil.which("python3.10") or ""]
    for exe in candidates:
        if exe and os.path.exists(exe):
            run = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                                 capture_output=True, text=True)
            if run.stdout.strip() == "True":
                return exe
    return None


def test_every_file_compiles_under_python_310():
    exe = python310()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("no Python 3.10 found to check the sources with")
        pytest.skip("no Python 3.10 here")
    run = subprocess.run([exe, "-c", COMPILE_ALL, *SOURCES], capture_output=True, text=True)
    assert run.returncode == 0, f"syntax Python 3.10 lacks:\n{run.stdout}{run.stderr}"


def engine_modules() -> list[str]:
    """Every module of the engine; lib_lora.webui needs the WebUI's ``modules`` (tests/webui load it there)."""
    found = pkgutil.walk_packages(lib_lora.__path__, prefix="lib_lora.")
    return sorted(m.name for m in found if not m.name.startswith("lib_lora.webui"))


@pytest.mark.parametrize("name", engine_modules())
def test_every_engine_module_imports(name):
    importlib.import_module(name)

