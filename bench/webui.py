#!/usr/bin/env python
"""The first job with a network, in the real WebUI (the test bed's A1111 v1.10.1, SD1.5 fp32 on the CPU): the
extra time of the first, the cached and the changed-weight generation with a 264-module rank-32 kohya LoRA
(``lorafiles.attention_lora`` on the full SD1.5 model, fp16, 37.9 MB, as bench/engine.py), per phase
(activation, text encoder, each sampling step, decode), for this extension and for the built-in Lora alone.

Each round starts the WebUI once per configuration (alternating, so both see the same machine), with
bench/webui_probe linked in: it reads the clock around the WebUI's phases and, on request, measures the floor of
the activation inside the WebUI process (one read and write of every weight the network touches, plus the
deltas' matmuls, as bench/engine.py's ``Floor``). Per round and configuration:

    2 plain warm-up jobs, plain (P), first with the network (F), the same again (C: cached), weight 0.5 (W),
    plain again (R: after restore), weight 0.5 again (C2: applied again after the plain job)

Extra time = a phase's time minus the same phase in P of the same WebUI run. The built-in merges lazily, in the
first forward of each layer (text encoder and first step), and keeps its backups; we merge during activation and
drop the backups on restore: compare whole jobs across the two, phases within one. Goals: our activation ≤ 1.2× the
floor; steps with a merged network no slower than plain ones.

Each job also reports what could make a step slower: minor page faults per step (on the CPU, torch's oneDNN
convolutions reorder each weight into a fresh buffer on every call; with glibc's malloc, memory handed back to the
kernel is faulted in again, and how much depends on the allocator's state), other threads' CPU time, whether
denormals are flushed, subnormal or non-contiguous parameters, and modules left with hooks.

Run (any Python with torch, e.g. the test venv):
    WEBUI_TESTBED=~/.cache/sd-webui-testbed python bench/webui.py [--rounds 2] [--steps 6] [--size 128]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
TB = ROOT.parent / "shared" / "webui-testbed"
PROBE = ROOT / "bench" / "webui_probe"
sys.path[:0] = [str(ROOT / "bench")]

from machine import cpu_model, loadavg  # noqa: E402

T0 = time.perf_counter()
CONFIGS = {"ours": ["--ext", f"sd-webui-lora={ROOT}", "--no-builtin-lora"], "built-in": []}
SEQUENCE = (("warm", ""), ("warm", ""), ("P", ""), ("F", "<lora:bench264:1>"), ("C", "<lora:bench264:1>"),
            ("W", "<lora:bench264:0.5>"), ("R", ""), ("C2", "<lora:bench264:0.5>"))


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def bed() -> str:
    return os.environ.get("WEBUI_TESTBED") or os.path.expanduser("~/.cache/sd-webui-testbed")


def call(url: str, method: str, path: str, body=None, timeout: float = 1800):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def start(config: str, lora_dir: str, threads: int | None = None, env: dict[str, str] | None = None) -> str:
    """The bed's WebUI in ``config``; ``threads``: torch's CPU threads (OMP_NUM_THREADS; unset: torch's default, one
    per core). On a machine shared with other jobs, one thread keeps the timings from swinging with the waits of
    threads that share a core. ``env``: more environment variables for the WebUI process."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {}))
    args = [str(TB / "start.sh"), bed(), "--port", "0", "--replace", "--reset-config", "--ext", f"bench-probe={PROBE}",
            *CONFIGS[config], "--", "--lora-dir", lora_dir]
    out = subprocess.run(args, stdout=subprocess.PIPE, text=True, timeout=1800, env=env)
    if out.returncode:
        raise SystemExit(f"the WebUI did not start ({config}); see {bed()}/webui.log")
    return out.stdout.strip().splitlines()[-1]


def stop() -> None:
    subprocess.run([str(TB / "stop.sh"), bed()], check=False, timeout=300)


def job(url: str, lora: str, args) -> dict:
    body = {"prompt": f"a photo of a cat {lora}".strip(), "steps": args.steps, "width": args.size, "height": args.size,
            "seed": 1, "sampler_name": "Euler", "cfg_scale": 7, "save_images": False}
    t0 = time.perf_counter()
    res = call(url, "POST", "/sdapi/v1/txt2img", body)
    wall = time.perf_counter() - t0
    info = json.loads(res["info"])
    errors = info.get("extra_generation_params", {}).get("Lora errors")
    if errors:
        raise SystemExit(f"Lora errors: {errors}")
    phases = call(url, "GET", "/bench/v1/last")
    return {"wall": wall, "job": sum(phases.get("job", [0])), "activation": sum(phases.get("activation", [0])),
            "text_encoder": sum(phases.get("text_encoder", [0])), "decode": sum(phases.get("decode", [0])),
            "steps": phases.get("steps", []), **{k: sum(v) for k, v in phases.items() if k.startswith("ours: ")},
            "hooked": phases.get("hooked_modules", [None])[0], "threads_cpu": phases.get("threads_cpu", [{}])[0],
            "weights": phases.get("weights", [{}])[0], "torch_threads": phases.get("torch_threads", [None])[0],
            "step_faults": phases.get("step_faults", []), "job_faults": sum(phases.get("job_faults", [0])),
            "flush_denormal": phases.get("flush_denormal", [None])[0],
            "hashes": info.get("extra_generation_params", {}).get("Lora hashes")}


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--floor-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch threads in the WebUI (default: torch's own choice)")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="run the jobs with denormal numbers flushed to zero (with --threads 1: the job's thread is all)")
    ap.add_argument("--mmap-threshold", type=int,
                    help="glibc's MALLOC_MMAP_THRESHOLD_ for the WebUI (bytes): a fixed threshold, so that freed "
                         "blocks below it stay in the heap instead of going back to the kernel")
    ap.add_argument("--preload", help="LD_PRELOAD for the WebUI, e.g. /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 "
                                      "(webui.sh preloads tcmalloc when it is installed; start.sh runs launch.py)")
    ap.add_argument("--only", choices=list(CONFIGS), help="one configuration only")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import lorafiles
    import models

    log(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible), load average {loadavg()}, bed {bed()}")
    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    floors: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="lora-webui-bench-") as tmp:
        path = lorafiles.save(pathlib.Path(tmp) / "bench264.safetensors",
                              lorafiles.attention_lora(models.full_model("sd1", device="meta"), rank=32, alpha=16,
                                                       seed=11),
                              {"ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_base_model_version": "sd_v1"})
        log(f"network: {os.path.getsize(path) / 1e6:.1f} MB")
        try:
            for r in range(args.rounds):
                for config in [c for c in (CONFIGS if r % 2 == 0 else list(CONFIGS)[::-1]) if c == (args.only or c)]:
                    log(f"round {r + 1}: starting the WebUI ({config}) ...")
                    url = start(config, tmp, args.threads, webui_env(args))
                    run = {}
                    for label, lora in SEQUENCE:
                        run[label] = job(url, lora, args)
                        x = run[label]
                        log(f"  {config} {label}: job {x['job']:.2f} s, activation {x['activation']:.3f} s, text encoder "
                            f"{x['text_encoder']:.3f} s, steps {', '.join(f'{s:.2f}' for s in x['steps'])}, "
                            f"modules with hooks {x['hooked']}; other threads' CPU s {x['threads_cpu']}; "
                            f"parameters {x['weights']}; torch threads {x['torch_threads']}; minor page faults: job "
                            f"{x['job_faults']:,}, steps {', '.join(f'{n:,}' for n in x['step_faults'])}; "
                            f"flushes denormals {x['flush_denormal']}; "
                            + ", ".join(f"{k} {v:.3f} s" for k, v in x.items() if k.startswith("ours: ")))
                    if config == "ours":
                        floor = call(url, "GET", f"/bench/v1/floor?path={urllib.request.quote(path)}"
                                                 f"&repeats={args.floor_repeats}")
                        floors.append((floor["floor"], floor["fresh"]))
                        log(f"  floor in the WebUI process: {floor}")
                    results[config].append(run)
                    stop()
        finally:
            stop()
    print(table(results, floors, args))
    return 0


def webui_env(args) -> dict[str, str]:
    env = {"BENCH_FLUSH_DENORMAL": "1"} if args.flush_denormal else {}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if args.preload:
        env["LD_PRELOAD"] = args.preload
    return env


def extra(runs: list[dict], label: str, phase: str) -> float:
    """Median over rounds of (phase in ``label``) − (phase in the plain job P of the same run)."""
    def value(run, lab):
        v = run[lab][phase]
        return sum(v) if isinstance(v, list) else v
    return med([value(run, label) - value(run, "P") for run in runs])


def step_time(runs: list[dict], label: str) -> float:
    return med([s for run in runs for s in run[label]["steps"][1:]])  # the first step pays for lazy work


def step_faults(runs: list[dict], label: str) -> float:
    """Median minor page faults per step (first step left out)."""
    return med([n for run in runs for n in run[label].get("step_faults", [])[1:]])


def ratio(a: float, b: float) -> float:
    return a / b if b == b and abs(b) > 0.005 else float("nan")


def table(results: dict[str, list[dict]], floors: list[tuple[float, float]], args) -> str:
    ours, builtin = results["ours"], results["built-in"]
    rows = [f"SD1.5 fp32, {args.size}×{args.size}, {args.steps} Euler steps, {len(ours)} rounds (median), "
            f"torch threads: {args.threads or 'default'}, denormals flushed: {'yes' if args.flush_denormal else 'no'}, "
            f"MALLOC_MMAP_THRESHOLD_: {args.mmap_threshold or 'unset (glibc adjusts it)'}, "
            f"LD_PRELOAD: {args.preload or 'none (glibc malloc)'}, "
            f"load average {loadavg()} (shared machine: compare within a column pair)", "",
            "| extra time over a plain job | ours | built-in | ours / built-in |", "|---|---|---|---|"]
    for label, title in (("F", "first generation"), ("C", "same network again (cached)"),
                         ("W", "changed weight (0.5)"), ("C2", "weight 0.5 again, after a plain job")):
        for phase, name in (("job", "whole job"), ("activation", "activation"), ("text_encoder", "text encoder"),
                            ("steps", "all steps"), ("decode", "decode")):
            a, b = extra(ours, label, phase), extra(builtin, label, phase)
            rows.append(f"| {title}: {name} | {a:+.3f} s | {b:+.3f} s | {ratio(a, b):.2f} |")
    rows += ["", "| step time (median, first step left out) | ours | / plain before | page faults / step | built-in "
                 "| / plain before | page faults / step |", "|---|---|---|---|---|---|---|"]
    for label, title in (("P", "plain, before"), ("F", "network, first job"), ("C", "network, cached"),
                         ("W", "network, weight 0.5"), ("R", "plain, after restore"),
                         ("C2", "network, weight 0.5, after the plain job")):
        a, b = step_time(ours, label), step_time(builtin, label)
        rows.append(f"| {title} | {a:.3f} s | {ratio(a, step_time(ours, 'P')):.2f} | {step_faults(ours, label):,.0f} | "
                    f"{b:.3f} s | {ratio(b, step_time(builtin, 'P')):.2f} | {step_faults(builtin, label):,.0f} |")
    if floors:
        act = med([run["F"]["activation"] for run in ours])
        parts = ", ".join(f"{k[6:]} {med([run['F'].get(k, 0.0) for run in ours]):.3f} s" for k in ("ours: load", "ours: hash",
                                                                                                   "ours: apply"))
        warm, fresh = med([f[0] for f in floors]), med([f[1] for f in floors])
        rows += ["", f"Our first activation {act:.3f} s ({parts}); floor in the WebUI process {warm:.3f} s "
                     f"(one read+write of each touched weight + the deltas' matmuls): {act / warm:.2f}× the floor; "
                     f"{act / fresh:.2f}× the floor with its copy into fresh memory ({fresh:.3f} s), as any backup needs."]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
