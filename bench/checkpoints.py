#!/usr/bin/env python
"""Peak memory of the tools' checkpoint jobs on a real-size checkpoint (default: the WebUI test bed's 2 GB SD1.5),
each job in a fresh process, against the safetensors library's ``load_file``/``save_file`` (what the tools used
before) on the same file in the same run. Prints peak RSS (VmHWM) over the file's size, of the
whole process and above its start (Python with torch imported); target: loading under 1.2× the file.

Jobs: load (every tensor touched once); merge a 264-module rank-32 LoRA into the checkpoint and save it; extract
a rank-8 network from the checkpoint and that merged copy.

Run:  python bench/checkpoints.py [--checkpoint PATH]   (the bed's Python or the test venv)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

JOB = r"""
import json, os, sys
job, ckpt, out, lora, root = sys.argv[1:6]
sys.path[:0] = [root, root + "/tests", root + "/bench"]
import torch
from machine import proc_status
torch.set_num_threads(2)


base = proc_status("VmHWM")
if job == "load":
    from lib_lora.tools import read_checkpoint
    tensors, _ = read_checkpoint(ckpt)
    total = sum(float(t.float().sum()) for t in tensors.values() if t.is_floating_point())
elif job == "load (library)":
    from safetensors.torch import load_file
    tensors = load_file(ckpt)
    total = sum(float(t.float().sum()) for t in tensors.values() if t.is_floating_point())
elif job == "merge + save":
    from lib_lora import load
    from lib_lora.tools import merge_into_checkpoint, read_checkpoint, save_checkpoint
    tensors, metadata = read_checkpoint(ckpt)
    merge_into_checkpoint([(load(lora), 0.8)], tensors)
    save_checkpoint(out, tensors, metadata)
elif job == "merge + save (library)":
    from safetensors.torch import load_file, save_file
    from lib_lora import load
    from lib_lora.tools import merge_into_checkpoint
    tensors = load_file(ckpt)
    merge_into_checkpoint([(load(lora), 0.8)], tensors)
    save_file(tensors, out)
elif job == "extract":
    from lib_lora.tools import RankRule, as_modules, extract, read_checkpoint
    trees = [as_modules(read_checkpoint(p)[0]) for p in (ckpt, out)]
    extract(trees[0], trees[1], RankRule(8, 0), 1e-4)
elif job == "extract (library)":
    from safetensors.torch import load_file
    from lib_lora.tools import RankRule, as_modules, extract
    trees = [as_modules(load_file(p)) for p in (ckpt, out)]
    extract(trees[0], trees[1], RankRule(8, 0), 1e-4)
print(json.dumps({"start": base, "peak": proc_status("VmHWM")}))
"""


def default_checkpoint() -> str:
    bed = os.environ.get("WEBUI_TESTBED") or os.path.expanduser("~/.cache/sd-webui-testbed")
    return os.path.join(bed, "webui", "models", "Stable-diffusion", "random-sd15.safetensors")


def run(job: str, ckpt: str, out: str, lora: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", JOB, job, ckpt, out, lora, str(ROOT)],
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1] + f" (exit {proc.returncode})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=default_checkpoint())
    ap.add_argument("--tmp", help="folder for the network and the merged checkpoint (default: the system's temp folder)")
    ap.add_argument("--skip-library", action="store_true", help="only ours (the library's jobs need ~3x the file)")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import lorafiles
    import models

    size = os.path.getsize(args.checkpoint)
    print(f"checkpoint {args.checkpoint}: {size / 1e9:.2f} GB; Python {sys.version.split()[0]}", file=sys.stderr)
    rows = []
    # not beside the checkpoint: a run that is killed would leave a 2 GB "checkpoint" in the WebUI's model list
    with tempfile.TemporaryDirectory(prefix="lora-checkpoints-bench-", dir=args.tmp) as tmp:
        lora = lorafiles.save(pathlib.Path(tmp) / "r32.safetensors",
                              lorafiles.attention_lora(models.full_model("sd1", device="meta"), rank=32, seed=0), {})
        out = os.path.join(tmp, "merged.safetensors")
        for job in ("load", "merge + save", "extract"):
            for label in (job,) + (() if args.skip_library else (f"{job} (library)",)):
                res = run(label, args.checkpoint, out, lora)
                rows.append((label, res))
                print(f"{label}: {res}", file=sys.stderr)
    print("| job | peak RSS | / file size | above the process's start (Python + torch) / file size |\n|---|---|---|---|")
    for label, res in rows:
        if "error" in res:
            print(f"| {label} | failed: {res['error']} | | |")
        else:
            print(f"| {label} | {res['peak'] / 1e9:.2f} GB | {res['peak'] / size:.2f}× | "
                  f"{(res['peak'] - res['start']) / size:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
