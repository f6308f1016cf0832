"""A bench-only WebUI extension (bench/webui.py and bench/library.py link it in): times the phases of each
txt2img job (extra-network activation, text encoder, each sampling step, VAE decode, the whole job) and answers
``GET /bench/v1/last`` with the last job's figures. It wraps WebUI functions only to read the clock; it changes
nothing a job computes, and it is never part of the extension."""
import os
import pathlib
import statistics
import sys
import threading
import time

import torch
from modules import extra_networks, processing, script_callbacks, shared

ROOT = pathlib.Path(os.path.realpath(__file__)).parents[3]
FLUSH_DENORMAL = os.environ.get("BENCH_FLUSH_DENORMAL") == "1"

_lock = threading.Lock()
_job: dict = {}


def _now() -> float:
    return time.perf_counter()


def _timed(owner, name: str, phase: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = _now()
        try:
            return original(*args, **kwargs)
        finally:
            with _lock:
                _job.setdefault(phase, []).append(_now() - t0)

    setattr(owner, name, wrapper)


def _whole_job(original):
    def process_images_inner(p):
        _wrap_engine()
        if FLUSH_DENORMAL:  # per thread (the CPU's FP control word): here, in the thread that runs the job
            torch.set_flush_denormal(True)
        with _lock:
            _job.clear()
            _job["steps"] = []
        cpu0, faults0 = _thread_cpu(), _minor_faults()
        t0 = _now()
        try:
            return original(p)
        finally:
            with _lock:
                _job["job"] = [_now() - t0]
                _job["job_faults"] = [_minor_faults() - faults0]
                _job["flush_denormal"] = [_flushes_denormals()]
                _job["hooked_modules"] = [_hooked(shared.sd_model)]
                _job["threads_cpu"] = [_other_threads(cpu0, _thread_cpu())]
                _job["weights"] = [_weight_state(shared.sd_model)]
                _job["torch_threads"] = [torch.get_num_threads()]
                _last.clear()
                _last.update({k: list(v) for k, v in _job.items()})

    return process_images_inner


_engine_wrapped = []


def _wrap_engine() -> None:
    """With sd-webui-lora loaded: its activation split into reading the file, hashing it and patching the model."""
    if _engine_wrapped or "lib_lora.catalog" not in sys.modules:
        return
    from lib_lora import catalog, patcher
    _timed(catalog.Catalog, "load", "ours: load")
    _timed(catalog.Catalog, "ensure_hash", "ours: hash")
    _timed(patcher.Patcher, "apply", "ours: apply")
    _engine_wrapped.append(True)


def _hooked(model) -> int:
    """Modules of the model with a forward hook, pre-hook or replaced forward (a hook left in place would show)."""
    return sum(1 for m in model.modules() if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of this process, by thread id, with its name."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in pathlib.Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def _other_threads(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds used during the job by threads other than the one that ran it (and torch's workers, which share
    its name), summed by thread name: a background thread competing with the sampler would show here."""
    me = threading.get_native_id()
    used: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        if tid == me:
            continue
        spent = cpu - before.get(tid, (name, 0.0))[1]
        if spent >= 0.05:
            used[name] = round(used.get(name, 0.0) + spent, 2)
    return used


def _flushes_denormals() -> bool:
    """Whether this thread's floating-point unit flushes denormal results to zero (per-thread state)."""
    return float(torch.tensor(torch.finfo(torch.float32).tiny) * 0.5) == 0.0


def _weight_state(model) -> dict[str, int]:
    """Subnormal numbers, non-contiguous tensors and dtypes among the model's parameters: a merged weight written
    with any of these would make the steps slower."""
    subnormal = noncontig = 0
    dtypes: dict[str, int] = {}
    with torch.no_grad():
        for t in model.parameters():
            dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + 1
            noncontig += not t.is_contiguous()
            if t.is_floating_point():
                tiny = torch.finfo(t.dtype).tiny
                subnormal += int(((t != 0) & (t.abs() < tiny)).sum())
    return {"subnormal": subnormal, "non_contiguous": noncontig, **dtypes}


_last: dict = {}
processing.process_images_inner = _whole_job(processing.process_images_inner)
_timed(extra_networks, "activate", "activation")
_timed(processing.StableDiffusionProcessing, "setup_conds", "text_encoder")
_timed(processing, "decode_latent_batch", "decode")


def _minor_faults() -> int:
    """Minor page faults of the process so far: memory the kernel had to map (and zero) on first touch."""
    stat = pathlib.Path("/proc/self/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[7])


def _step_started(params) -> None:
    with _lock:
        _job["_step"] = (_now(), _minor_faults())


def _step_done(params) -> None:
    with _lock:
        if "_step" in _job:
            t0, f0 = _job.pop("_step")
            _job["steps"].append(_now() - t0)
            _job.setdefault("step_faults", []).append(_minor_faults() - f0)


script_callbacks.on_cfg_denoiser(_step_started)
script_callbacks.on_cfg_after_cfg(_step_done)


def _routes(_demo, app) -> None:
    @app.get("/bench/v1/last")
    def last():
        with _lock:
            return {k: v for k, v in _last.items() if not k.startswith("_")}

    @app.get("/bench/v1/floor")
    def floor(path: str, repeats: int = 5):
        """bench/engine.py's floor for this network on the loaded model's own weights, in this process: the copy into
        memory written before (``floor``) and into fresh memory, as a backup is made (``fresh``)."""
        sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
        from engine import Floor
        from lib_lora import Patcher, Use, load

        patcher = Patcher(shared.sd_model)
        plan = patcher.plan([Use(load(path))], "merge").merge
        floor = Floor.of_plan(plan, patcher.index.by_name)
        times, fresh = [], []
        for _ in range(repeats):
            copy, matmuls = floor.measure()
            times.append(copy + matmuls)
            fresh.append(floor.measure_alloc() + matmuls)
        return {"floor": statistics.median(times), "fresh": statistics.median(fresh), "all": times,
                "modules": len(plan), "touched_bytes": floor.nbytes}


script_callbacks.on_app_started(_routes)
