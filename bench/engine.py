#!/usr/bin/env python
"""Engine benchmark: full-size SD1.5 (ldm UNet + CLIP-L, fp32, random weights) and a 264-module
rank-32 kohya LoRA (fp16, ~37.9 MB, the common size).

Measured in one process (medians of ``--repeats`` runs where cheap):

* floor: one read+write of every weight the LoRA touches (``dst.copy_(src)`` into preallocated
  tensors), and the deltas' matmuls alone (``up @ down`` in fp32 for all 264 modules);
* ours: ``lib_lora.load``, first apply (merge, fresh Patcher, cold factor cache), re-apply of the
  same set, change of one weight in a stack of three networks, restore; UNet step (64×64 latent)
  plain / bypass / merge;
* memory, per mode: peak and held extra memory on the weights' device and in CPU RAM (resident
  memory) while a network is applied (and, in bypass mode, during a UNet step). On CUDA the device's
  figure is ``torch.cuda.max_memory_allocated`` and the backups sit in (pinned) CPU memory, as in
  the WebUI. On a CPU-only machine the weights' device is the CPU itself: the backups are then put in
  memory torch's allocator never sees (``BackupPlace`` injected, as tests/test_devices.py does), and
  the device's figure is what torch allocates meanwhile (its profiler's records);
* diffusers: the same file through ``StableDiffusionLoraLoaderMixin.lora_state_dict`` +
  ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` into a diffusers ``UNet2DConditionModel``
  (SD1.5 config) and a transformers ``CLIPTextModel`` (CLIP-L config) that hold our model's weight
  tensors, then ``fuse_lora`` / ``unfuse_lora`` in the same rounds as ours.

The machine may be shared: every round measures the floor right next to the operation; the
table gives the median of the per-round ratios and the best-of ratio.

Progress goes to stderr; the markdown table (for the README) goes to stdout.
Nothing is downloaded.  Run:  python bench/engine.py [--repeats 7] [--fwd-repeats 3] [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import cpu_model, loadavg, proc_status, reset_peak  # noqa: E402
import torch  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- helpers --------------------------------------------------------------------------------
def rss() -> int:
    return proc_status("VmRSS")


def peak_rss() -> int:
    return proc_status("VmHWM")


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def trim() -> None:
    """Free what can be freed, so RSS deltas show what is really held."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


CUDA = [False]  # set by main() when the model is on a CUDA device: timings then wait for its queue


PROCESS_PEAK = [0]  # VmHWM before each reset: the process's own peak is the largest of them


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current resident memory (Linux: ``clear_refs`` 5)."""
    PROCESS_PEAK[0] = max(PROCESS_PEAK[0], peak_rss())
    if not reset_peak():
        raise OSError("VmHWM cannot be reset here (/proc/self/clear_refs)")


def measure_memory(fn, device: torch.device) -> dict[str, int]:
    """Extra memory while ``fn`` runs, over what was there before: peak and held at the end, on the weights'
    device (CUDA: its allocator's count; CPU: what torch allocates, from its profiler's records) and in CPU RAM
    (the process's resident memory, VmHWM/VmRSS)."""
    from test_devices import torch_allocations

    trim()
    reset_peak_rss()
    r0 = rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        d0 = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        dev_peak, dev_held = torch.cuda.max_memory_allocated(device) - d0, torch.cuda.memory_allocated(device) - d0
    else:
        dev_peak, dev_held = torch_allocations(fn)
    ram_peak = peak_rss() - r0
    trim()
    return {"dev_peak": dev_peak, "dev_held": dev_held, "ram_peak": ram_peak, "ram_held": rss() - r0}


def backup_place(device: torch.device):
    """Where a merge's backups go: the default (CPU memory beside a GPU's weights); on a CPU-only machine, memory
    outside torch's allocator, so that what a merge needs beside the weights shows on its own."""
    from lib_lora.devices import BackupPlace
    from test_devices import OffHeap

    return OffHeap() if device.type == "cpu" else BackupPlace()


def layer_buffer_bytes(modules, network) -> int:
    """One layer's fp32 work buffer (the largest touched weight and bias) plus the largest module's factors in
    fp32: what a merge may hold beside the weights at any moment."""
    layer = max(m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0) for m in modules)
    factors = max(sum(t.numel() for t in a.w.values()) for a in network.modules.values())
    return (layer + factors) * 4


def now() -> float:
    if CUDA[0]:
        torch.cuda.synchronize()
    return time.perf_counter()


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.2f} s"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# ---- the networks ---------------------------------------------------------------------------
def kohya_modules(sd: dict) -> list[str]:
    return [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]


def only_modules(sd: dict, keep) -> dict:
    mods = {m for m in kohya_modules(sd) if keep(m)}
    return {k: v for k, v in sd.items() if k.rsplit(".", 2)[0] in mods or k.rsplit(".", 1)[0] in mods}


def make_files(tmp: Path, rank: int) -> tuple[Path, Path, Path]:
    from lorafiles import attention_lora, save
    from models import full_model

    meta = full_model("sd1", device="meta")
    a = attention_lora(meta, rank=rank, alpha=rank / 2, seed=11)
    # B: text encoder only (72 modules); C: UNet cross-attention (attn2) only (64 modules).
    b = only_modules(attention_lora(meta, rank=rank // 2, alpha=rank / 4, seed=12), lambda m: m.startswith("lora_te_"))
    c = only_modules(attention_lora(meta, rank=rank // 2, alpha=rank / 4, seed=13),
                     lambda m: "_attentions_" in m and "_attn2_" in m)
    meta_ss = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_base_model_version": "sd_v1"}
    paths = []
    for name, sd in (("a", a), ("b", b), ("c", c)):
        paths.append(Path(save(tmp / f"bench_{name}.safetensors", sd, meta_ss)))
    return tuple(paths)


def factor_cache_bytes(net) -> int:
    # Adapter._cache is private; read only to report what the fp32 factor copies hold.
    return sum(t.numel() * t.element_size() for a in net.modules.values() for t in getattr(a, "_cache", {}).values())


def drop_caches(*nets) -> None:
    for net in nets:
        for a in net.modules.values():
            a.drop_cache()


def fp32_factors(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    up = adapter.w["lora_up.weight"].float()
    down = adapter.w["lora_down.weight"].float()
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


class Floor:
    """For a set of weights: one read+write of each (``dst.copy_(src)`` into preallocated tensors),
    and the matmuls of the deltas that land on it (``up @ down`` in fp32, written into the same
    preallocated tensors: compute and one write, not page faults)."""

    def __init__(self, weights: list[torch.Tensor], facts: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        self.weights, self.facts = [w.detach() for w in weights], facts
        self.dst = [torch.empty_like(w) for w in self.weights]
        self.flops = sum(2 * up.shape[0] * up.shape[1] * down.shape[1] for fs in self.facts for up, down in fs)
        self.matmuls = sum(len(fs) for fs in self.facts)
        self.nbytes = sum(w.numel() * w.element_size() for w in self.weights)

    @classmethod
    def of_plan(cls, plan: dict, named: dict) -> "Floor":
        """From ``Patcher.plan``'s merge part: module name -> contributions."""
        return cls([named[n].weight for n in plan], [[fp32_factors(c.adapter) for c in cs] for cs in plan.values()])

    def measure(self) -> tuple[float, float]:
        t = now()
        for d, w in zip(self.dst, self.weights):
            d.copy_(w)
        c = now() - t
        t = now()
        for d, fs in zip(self.dst, self.facts):
            o = d.view(d.shape[0], -1)
            for up, down in fs:
                torch.mm(up, down, out=o)
        return c, now() - t

    def measure_alloc(self) -> float:
        """The same read+write into freshly allocated memory (what making any backup costs)."""
        t = now()
        clones = [w.clone() for w in self.weights]
        dt = now() - t
        del clones
        trim()
        return dt


def attribution_hooks(module: torch.nn.Module, acc: list[float]) -> list:
    """Forward hooks around the hooks already on ``module``: adds the time they take to ``acc[0]``."""
    state = {}

    def start(_m, _a, _o):
        state["t"] = now()

    def end(_m, _a, _o):
        acc[0] += now() - state["t"]

    return [module.register_forward_hook(start, prepend=True), module.register_forward_hook(end)]


# ---- main -----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="rounds of the apply/restore/floor timings (median, min)")
    ap.add_argument("--fwd-repeats", type=int, default=3, help="rounds of UNet forwards, one per mode each (median)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="stop adding UNet rounds (after 3) once this many seconds have passed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--no-forward", action="store_true", help="skip the UNet step timings")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model's weights live (default: cuda when there is one, else cpu)")
    args = ap.parse_args()
    device = torch.device(args.device)
    CUDA[0] = device.type == "cuda"
    R = max(3, args.repeats)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import lib_lora
    from lib_lora import Patcher, Use
    from lib_lora.model_index import checkpoint_name
    from models import full_model

    gpu = f", GPU: {torch.cuda.get_device_name(device)}" if CUDA[0] else ""
    info = (f"torch {torch.__version__}, weights on {device}{gpu}, {torch.get_num_threads()} threads, CPU: {cpu_model()} "
            f"({os.cpu_count()} logical cores visible), Python {platform.python_version()}, "
            f"load average at start {loadavg()}")
    log(info)
    out: dict[str, object] = {}
    tmpdir = tempfile.TemporaryDirectory(prefix="lora-bench-")
    tmp = Path(tmpdir.name)

    # ---- files ----
    log(f"writing the networks (rank {args.rank}, fp16) ...")
    path_a, path_b, path_c = make_files(tmp, args.rank)
    size_a = path_a.stat().st_size
    log(f"network A: {path_a.name}, {size_a:,} bytes ({size_a / 1e6:.1f} MB, {size_a / 2**20:.1f} MiB)")

    # ---- model ----
    log("building the full-size SD1.5 model (ldm UNet + CLIP-L, fp32, random) ...")
    t = now()
    model = full_model("sd1", seed=0, device=device)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"  built in {now() - t:.1f} s: {nparams / 1e9:.3f} G parameters, {mb(nparams * 4)}; RSS {mb(rss())}")
    named = {checkpoint_name(n): m for n, m in model.named_modules()}

    # ---- load ----
    trim()
    r0 = rss()
    load_times = []
    net_a = None
    for _ in range(R):
        net_a = None
        gc.collect()
        t = now()
        net_a = lib_lora.load(str(path_a))
        load_times.append(now() - t)
    trim()
    out["load"] = med(load_times)
    net_b = lib_lora.load(str(path_b))
    net_c = lib_lora.load(str(path_c))
    log(f"lib_lora.load(A): median {ms(out['load'])} ({', '.join(ms(x) for x in load_times)}); "
        f"{len(net_a.modules)} modules, kinds {net_a.kind_counts}, rank {net_a.rank}, format {net_a.format}, "
        f"family {net_a.base_model}; factors {mb(net_a.nbytes())}; RSS +{mb(rss() - r0)} with B and C")
    log(f"  B: {len(net_b.modules)} modules (text encoder), C: {len(net_c.modules)} modules (UNet attn2)")
    n_modules = len(net_a.modules)
    out["modules"] = n_modules
    out["file_size"] = size_a

    # ---- what A touches ----
    probe = Patcher(model)
    plan = probe.plan([Use(net_a)], "merge")
    merge_plan, res = plan.merge, plan.result
    assert not res.skipped and not res.errors, (res.skipped, res.errors)
    touched = {name: named[name] for name in merge_plan}
    del probe, plan, merge_plan
    weights = [m.weight for m in touched.values()]
    touched_bytes = sum(w.numel() * w.element_size() for w in weights)
    param_bytes = sum(p.numel() * p.element_size() for m in touched.values() for p in m.parameters(recurse=False))
    log(f"A matches {len(res.matched)} modules; touched weights {mb(touched_bytes)} "
        f"(weights+biases {mb(param_bytes)})")
    out["touched_bytes"] = touched_bytes
    c_modules = set(Patcher(model).plan([Use(net_c)], "merge").result.matched)

    # ---- memory per mode (first thing after load, so the heap is as clean as it gets) ----
    place = backup_place(device)
    out["layer_buffer"] = layer_buffer_bytes(touched.values(), net_a)
    out["device_note"] = ("CPU: torch's allocations, the backups injected outside torch" if device.type == "cpu"
                          else f"{device}: `torch.cuda.max_memory_allocated`, the backups in pinned CPU memory")
    log(f"memory of merge mode: backups in {type(place).__name__} "
        f"({'outside torch, standing in for CPU RAM beside a GPU' if device.type == 'cpu' else 'CPU memory'}); "
        f"one layer's fp32 buffer + factors {mb(out['layer_buffer'])} ...")
    drop_caches(net_a)
    p = Patcher(model, backups=place)
    got = measure_memory(lambda: p.apply([Use(net_a)], "merge"), device)
    out.update({f"merge_{k}": v for k, v in got.items()}, merge_backup=p.backup_bytes(),
               merge_cache=factor_cache_bytes(net_a))
    log(f"  merge: {device} peak +{mb(got['dev_peak'])}, held +{mb(got['dev_held'])}; CPU RAM peak "
        f"+{mb(got['ram_peak'])}, held +{mb(got['ram_held'])}; backups {mb(p.backup_bytes())}; fp32 factor copies "
        f"held {mb(out['merge_cache'])}")
    p.restore()
    del p
    trim()

    log("memory of bypass mode ...")
    drop_caches(net_a)
    p = Patcher(model, backups=place)
    got = measure_memory(lambda: p.apply([Use(net_a)], "bypass"), device)
    out.update({f"bypass_{k}": v for k, v in got.items()}, bypass_backup=p.backup_bytes())
    log(f"  bypass apply: {device} peak +{mb(got['dev_peak'])}, held +{mb(got['dev_held'])}; CPU RAM peak "
        f"+{mb(got['ram_peak'])}, held +{mb(got['ram_held'])}; backups {mb(p.backup_bytes())} "
        f"(the fp32 factor copies are made by the first step)")
    p.restore()
    del p
    trim()

    # ---- diffusers on the same weights ----
    twin = None
    if not args.no_diffusers:
        log("diffusers reference: UNet2DConditionModel (SD1.5 config) + CLIPTextModel (CLIP-L config) sharing our "
            "weight tensors; loading the same file through diffusers ...")
        try:
            twin = DiffusersTwin(path_a, named)
            out.update(d_load=twin.load_time, d_rss=twin.rss, d_layers=len(twin.layers))
            log(f"  {twin.versions}: lora_state_dict + load_lora_into_unet/_text_encoder {ms(twin.load_time)}; "
                f"{len(twin.layers)} PEFT layers, {twin.shared} on our weight tensors; RSS +{mb(twin.rss)}")
            if twin.shared != n_modules or len(twin.layers) != n_modules:
                raise RuntimeError(f"diffusers made {len(twin.layers)} LoRA layers ({twin.shared} on our weights); "
                                   f"ours matched {n_modules}")
            probe_w = twin.layers[0].base_layer.weight
            before = probe_w.detach().clone()
            out["d_fuse_first"] = twin.fuse()
            changed = not torch.equal(probe_w, before)
            out["d_unfuse_first"] = twin.unfuse()
            out["d_roundtrip_err"] = (probe_w - before).abs().max().item()
            log(f"  first fuse_lora {ms(out['d_fuse_first'])} (weights changed: {changed}), unfuse_lora "
                f"{ms(out['d_unfuse_first'])}; max|unfused-original| {out['d_roundtrip_err']:.1e}")
            del probe_w, before
        except Exception as e:  # noqa: BLE001 - the reason is the result
            out["diffusers_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(f"  diffusers reference failed: {out['diffusers_error']}")
            twin = None

    # ---- floor, interleaved with ours (the machine is shared: both see the same load) ----
    floor_a = Floor.of_plan(Patcher(model).plan([Use(net_a)], "merge").merge, named)
    # on C's modules both A and C contribute: one read+write of each weight, matmuls of both deltas
    plan_ac = Patcher(model).plan([Use(net_a), Use(net_c)], "merge").merge
    floor_c = Floor.of_plan({n: cs for n, cs in plan_ac.items() if n in c_modules}, named)
    del plan_ac
    log(f"floor: one read+write of {len(floor_a.weights)} touched weights ({mb(floor_a.nbytes)}), "
        f"{floor_a.matmuls} delta matmuls ({floor_a.flops / 1e9:.1f} GFLOP); C's modules: {len(floor_c.weights)} "
        f"weights ({mb(floor_c.nbytes)}), {floor_c.matmuls} matmuls")
    floor_a.measure()  # warm-up (pages, BLAS)
    fl, fm, fal = [], [], []
    log(f"ours: first apply (merge, fresh Patcher, cold factor cache), re-apply, restore × {R}, "
        f"each round next to a floor measurement ...")
    idx_t, first, first_warm, again, again_written, rest = [], [], [], [], [], []
    r_first, r_warm, r_rest = [], [], []
    fuse, unfuse, r_fuse, r_unfuse = [], [], [], []
    for i in range(R):
        c, m = floor_a.measure()
        fl.append(c)
        fm.append(m)
        fal.append(floor_a.measure_alloc())
        drop_caches(net_a)
        trim()
        t = now()
        p = Patcher(model)
        idx_t.append(now() - t)
        t = now()
        res = p.apply([Use(net_a)], "merge")
        first.append(now() - t)
        assert len(res.written) == n_modules, len(res.written)
        t = now()
        res2 = p.apply([Use(net_a)], "merge")
        again.append(now() - t)
        again_written.append(len(res2.written))
        t = now()
        p.restore()
        rest.append(now() - t)
        del p
        trim()
        # the same with the factor cache warm (a network already used once this session)
        p = Patcher(model)
        t = now()
        p.apply([Use(net_a)], "merge")
        first_warm.append(now() - t)
        p.restore()
        del p
        trim()
        r_first.append(first[-1] / (c + m))
        r_warm.append(first_warm[-1] / (c + m))
        r_rest.append(rest[-1] / c)
        dtxt = ""
        if twin is not None:
            fuse.append(twin.fuse())
            unfuse.append(twin.unfuse())
            trim()
            r_fuse.append(fuse[-1] / (c + m))
            r_unfuse.append(unfuse[-1] / c)
            dtxt = f"; diffusers fuse_lora {ms(fuse[-1])} = {r_fuse[-1]:.2f}×, unfuse_lora {ms(unfuse[-1])}"
        log(f"  #{i + 1}: floor {ms(c)} + matmuls {ms(m)} (into fresh memory: {ms(fal[-1])}); Patcher() {ms(idx_t[-1])}, "
            f"first apply {ms(first[-1])} = {r_first[-1]:.2f}× (floor+mm) (warm cache {ms(first_warm[-1])}), "
            f"re-apply {ms(again[-1])} written {again_written[-1]}, restore {ms(rest[-1])}{dtxt} (load {loadavg()})")
    out.update(rounds=R, floor=med(fl), matmul=med(fm), floor_alloc=med(fal), index=med(idx_t), first=med(first),
               first_warm=med(first_warm), again=med(again), again_written=max(again_written), restore=med(rest),
               r_first=med(r_first), r_warm=med(r_warm), r_rest=med(r_rest), r_again=med(again) / med(fl),
               r_first_alloc=med([a / (b + c) for a, b, c in zip(first, fal, fm)]),
               m_first=min(first) / (min(fl) + min(fm)), m_warm=min(first_warm) / (min(fl) + min(fm)),
               m_rest=min(rest) / min(fl), min_floor=min(fl), min_mm=min(fm), min_first=min(first),
               min_rest=min(rest))
    out["floor_mm"] = out["floor"] + out["matmul"]
    if fuse:
        out.update(d_fuse=med(fuse), d_unfuse=med(unfuse), d_r_fuse=med(r_fuse), d_r_unfuse=med(r_unfuse),
                   d_m_fuse=min(fuse) / (min(fl) + min(fm)), d_m_unfuse=min(unfuse) / min(fl),
                   vs_fuse=med([a / b for a, b in zip(first, fuse)]), vs_unfuse=med([a / b for a, b in zip(rest, unfuse)]),
                   vs_fuse_warm=med([a / b for a, b in zip(first_warm, fuse)]),
                   vs_fuse_min=min(first) / min(fuse), vs_fuse_warm_min=min(first_warm) / min(fuse),
                   vs_unfuse_min=min(rest) / min(unfuse))
        log(f"  diffusers medians: fuse_lora {ms(out['d_fuse'])} ({out['d_r_fuse']:.2f}× floor+mm), unfuse_lora "
            f"{ms(out['d_unfuse'])} ({out['d_r_unfuse']:.2f}× floor); ours / theirs per round: first apply "
            f"{out['vs_fuse']:.2f}×, restore {out['vs_unfuse']:.2f}×")
    twin = None
    trim()
    log(f"  medians: floor {ms(out['floor'])} ({touched_bytes * 2 / out['floor'] / 1e9:.1f} GB/s r+w), matmuls "
        f"{ms(out['matmul'])} ({floor_a.flops / out['matmul'] / 1e9:.0f} GFLOP/s); first apply {ms(out['first'])} "
        f"(per-round ratio {out['r_first']:.2f}× floor+mm), warm {ms(out['first_warm'])} ({out['r_warm']:.2f}×), "
        f"restore {ms(out['restore'])} ({out['r_rest']:.2f}× floor)")
    del floor_a
    trim()

    # ---- ours: stack of three, change one weight ----
    log(f"ours: stack A({len(net_a.modules)}) + B({len(net_b.modules)}) + C({len(net_c.modules)}); "
        f"change C's weight × {R}, each next to C's floor ...")
    floor_c.measure()
    p = Patcher(model)
    t = now()
    res = p.apply([Use(net_a), Use(net_b), Use(net_c)], "merge")
    stack_first = now() - t
    t = now()
    res = p.apply([Use(net_a), Use(net_b), Use(net_c)], "merge")
    stack_again, stack_again_written = now() - t, len(res.written)
    chg, chg_written, chg_subset, r_chg, fcs = [], [], [], [], []
    for i in range(R):
        c, m = floor_c.measure()
        fcs.append(c + m)
        w = 0.5 if i % 2 == 0 else 1.0
        t = now()
        res = p.apply([Use(net_a), Use(net_b), Use(net_c, te=w, unet=w)], "merge")
        chg.append(now() - t)
        chg_written.append(len(res.written))
        chg_subset.append(set(res.written) <= c_modules)
        r_chg.append(chg[-1] / (c + m))
    t = now()
    p.restore()
    stack_restore = now() - t
    del p, floor_c
    trim()
    out.update(stack_first=stack_first, stack_again=stack_again, stack_again_written=stack_again_written,
               change=med(chg), change_written=max(chg_written), change_subset=all(chg_subset),
               c_count=len(c_modules), stack_restore=stack_restore, floor_c=med(fcs), r_change=med(r_chg),
               m_change=min(chg) / min(fcs))
    log(f"  stack first apply {ms(stack_first)}; re-apply {ms(stack_again)} written {stack_again_written}; "
        f"change C: median {ms(out['change'])} ({', '.join(ms(x) for x in chg)}; C's floor+mm {ms(out['floor_c'])}, "
        f"ratio {out['r_change']:.2f}×), rewritten {chg_written} of C's {len(c_modules)}, all within C: "
        f"{all(chg_subset)}; restore {ms(stack_restore)}")

    # ---- UNet step ----
    if not args.no_forward:
        unet = model.model.diffusion_model
        g = torch.Generator().manual_seed(5)
        x = torch.randn(1, 4, 64, 64, generator=g).to(device)
        ts = torch.tensor([500], device=device)
        ctx = torch.randn(1, 77, 768, generator=g).to(device)
        p = Patcher(model)

        def step():
            t = now()
            with torch.no_grad():
                y = unet(x, timesteps=ts, context=ctx)
            return now() - t, y

        log("UNet step at a 64×64 latent: warm-up (plain), then the memory of a plain step and of bypass mode's "
            "first step ...")
        dt, _ = step()
        log(f"  plain warm-up {ms(dt)}")
        plain_mem = measure_memory(step, device)
        drop_caches(net_a)
        p.apply([Use(net_a)], "bypass")
        bypass_mem = measure_memory(step, device)
        out["bypass_cache"] = factor_cache_bytes(net_a)
        p.restore()
        for k in ("dev_peak", "dev_held", "ram_peak", "ram_held"):
            out[f"step_plain_{k}"], out[f"step_bypass_{k}"] = plain_mem[k], bypass_mem[k]
        log(f"  plain step: {device} peak +{mb(plain_mem['dev_peak'])}, CPU RAM peak +{mb(plain_mem['ram_peak'])}; "
            f"bypass first step: {device} peak +{mb(bypass_mem['dev_peak'])}, held +{mb(bypass_mem['dev_held'])}; "
            f"CPU RAM peak +{mb(bypass_mem['ram_peak'])}, held +{mb(bypass_mem['ram_held'])} (fp32 factor copies "
            f"{mb(out['bypass_cache'])}, of which only the UNet's are made by a UNet step)")
        times = {"plain": [], "bypass": [], "merge": []}
        firsts = {"plain": [], "bypass": [], "merge": []}
        ys = {}
        rb, rm, share = [], [], []
        hook_time = [0.0]
        for i in range(args.fwd_repeats):
            order = ("plain", "bypass", "merge") if i % 2 == 0 else ("merge", "bypass", "plain")
            for mode in order:
                handles = []
                if mode != "plain":
                    res = p.apply([Use(net_a)], mode)
                # a job's steps after its first: the first after a change of the weights also pays for the
                # allocator's new state (the memory the change took and gave back), once per job
                firsts[mode].append(step()[0])
                if mode == "bypass":
                    # time the engine's hooks inside the same step: a marker hook just before each of
                    # them (prepend) and one just after; robust to the load changing between steps
                    hook_time[0] = 0.0
                    for name in res.written:
                        if name.startswith("model.diffusion_model."):
                            handles += attribution_hooks(named[name], hook_time)
                dt, ys[mode] = step()
                times[mode].append(dt)
                for h in handles:
                    h.remove()
                p.restore()
            rb.append(times["bypass"][-1] / times["plain"][-1])
            rm.append(times["merge"][-1] / times["plain"][-1])
            share.append(hook_time[0] / (times["bypass"][-1] - hook_time[0]))
            log(f"  round {i + 1}: plain {ms(times['plain'][-1])}, bypass {ms(times['bypass'][-1])} ({(rb[-1] - 1) * 100:+.1f} %; "
                f"its hooks {ms(hook_time[0])} = {share[-1] * 100:+.1f} % of the rest of the step), "
                f"merge {ms(times['merge'][-1])} ({(rm[-1] - 1) * 100:+.1f} %); the first steps after each apply: plain "
                f"{ms(firsts['plain'][-1])}, bypass {ms(firsts['bypass'][-1])}, merge {ms(firsts['merge'][-1])} (load {loadavg()})")
            if i >= 2 and now() - T0 > args.budget:
                log(f"  stopping after {i + 1} rounds: past the {args.budget:.0f} s budget")
                break
        diff = (ys["bypass"] - ys["merge"]).abs().max().item()
        eff = (ys["merge"] - ys["plain"]).abs().max().item()
        out.update(fwd_plain=med(times["plain"]), fwd_bypass=med(times["bypass"]), fwd_merge=med(times["merge"]),
                   fwd_diff=diff, fwd_effect=eff, fwd_over=med(rb) - 1, fwd_over_merge=med(rm) - 1,
                   fwd_over_min=min(times["bypass"]) / min(times["plain"]) - 1, fwd_rounds=len(rb),
                   fwd_share=med(share), fwd_share_min=min(share),
                   fwd_first_merge=med([m / q for m, q in zip(firsts["merge"], firsts["plain"])]) - 1)
        log(f"  medians: plain {ms(out['fwd_plain'])}, bypass {ms(out['fwd_bypass'])}, merge {ms(out['fwd_merge'])}; "
            f"bypass overhead (median of per-round ratios) {out['fwd_over'] * 100:+.1f} %, min/min "
            f"{out['fwd_over_min'] * 100:+.1f} %; in-step share of the bypass hooks {out['fwd_share'] * 100:+.1f} %; "
            f"merge {out['fwd_over_merge'] * 100:+.1f} %; "
            f"max|bypass-merge| {diff:.2e} (LoRA effect max|merge-plain| {eff:.2e})")
        del p, unet, ys

    # ---- free our model before building diffusers' (memory) ----
    del model, named, touched, weights
    net_a = net_b = net_c = None
    trim()
    log(f"freed our model; RSS {mb(rss())}")

    tmpdir.cleanup()
    log(f"done in {now() - T0:.0f} s; peak RSS {mb(max(PROCESS_PEAK[0], peak_rss()))}")
    print_table(out, info)
    return 0


class DiffusersTwin:
    """diffusers' loading + fusing path on the SAME weight tensors as our model.

    A diffusers ``UNet2DConditionModel`` (SD1.5 config, left on the meta device) and a transformers
    ``CLIPTextModel`` (CLIP-L config) whose LoRA-targeted Linear/Conv modules get our model's weight and
    bias Parameters; the file goes through ``StableDiffusionLoraLoaderMixin.lora_state_dict`` (kohya key
    conversion) and ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` (PEFT).  Sharing the
    tensors costs no memory and lets ``fuse_lora`` / ``unfuse_lora`` run in the same rounds as ours, on
    the same memory, under the same load.  (The text encoder is materialised: transformers' adapter
    loading leaves LoRA layers on the meta device otherwise; it is small.)"""

    def __init__(self, path: Path, named: dict):
        import diffusers
        import peft
        from diffusers import UNet2DConditionModel
        from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin
        from peft.tuners.tuners_utils import BaseTunerLayer
        from transformers import CLIPTextModel

        from lorafiles import diffusers_unet_name
        from models import _clip_text_config, _reset_buffers

        self.versions = f"diffusers {diffusers.__version__}, peft {peft.__version__}"
        with torch.device("meta"):
            self.unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
            te = CLIPTextModel(_clip_text_config(768, 12, 12, 3072, 49408))
        device = next(m.weight.device for m in named.values() if isinstance(getattr(m, "weight", None), torch.Tensor))
        self.te = te.to_empty(device=device)
        _reset_buffers(self.te)
        ours = {}
        for n, mod in named.items():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if n.startswith("model.diffusion_model."):
                ours[("unet", diffusers_unet_name(n[len("model.diffusion_model."):].replace(".", "_")))] = mod
            elif n.startswith("cond_stage_model.transformer."):
                ours[("te", n[len("cond_stage_model.transformer."):].replace(".", "_"))] = mod
        for part, root in (("unet", self.unet), ("te", self.te)):
            for dn, dm in root.named_modules():
                om = ours.get((part, dn.replace(".", "_")))
                if om is not None and isinstance(dm, type(om)) and dm.weight.shape == om.weight.shape:
                    dm.weight = om.weight
                    if dm.bias is not None:
                        dm.bias = om.bias
        trim()
        r0 = rss()
        t = now()
        sd, alphas = Mixin.lora_state_dict(str(path))
        Mixin.load_lora_into_unet(sd, alphas, unet=self.unet, adapter_name="bench")
        Mixin.load_lora_into_text_encoder(sd, alphas, text_encoder=self.te, adapter_name="bench")
        self.load_time = now() - t
        trim()
        self.rss = rss() - r0
        self.layers = [m for m in list(self.unet.modules()) + list(self.te.modules()) if isinstance(m, BaseTunerLayer)]
        ptrs = {m.weight.data_ptr() for m in named.values() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        self.shared = sum(m.base_layer.weight.data_ptr() in ptrs for m in self.layers)

    def fuse(self) -> float:
        from diffusers.loaders.lora_base import fuse_text_encoder_lora

        t = now()
        self.unet.fuse_lora(lora_scale=1.0)
        fuse_text_encoder_lora(self.te, lora_scale=1.0)
        return now() - t

    def unfuse(self) -> float:
        from diffusers.loaders.lora_base import unfuse_text_encoder_lora

        t = now()
        self.unet.unfuse_lora()
        unfuse_text_encoder_lora(self.te)
        return now() - t


def print_table(o: dict, info: str) -> None:
    def yes(b: bool, best_b: bool | None = None) -> str:
        txt = "yes" if b else "**no**"
        if best_b is not None and best_b != b:
            txt += f" (best-of: {'yes' if best_b else 'no'})"
        return txt

    floor, fmm = o["floor"], o["floor_mm"]
    has_d = o.get("d_fuse") is not None

    def vs_d(key: str, what: str) -> str:
        if not has_d:
            return ""
        return f"; {o[key]:.2f}× {what}{best(o[key + '_min'])}"

    def best(x: float) -> str:
        return f" [best-of: {x:.2f}×]"

    rows = [
        ("network file", f"{o['modules']} modules, rank 32, fp16, {o['file_size'] / 1e6:.1f} MB", "",
         "264 modules, 37.9 MB", yes(o["modules"] == 264 and abs(o["file_size"] / 1e6 - 37.9) < 0.15)),
        ("touched weights (fp32)", mb(o["touched_bytes"]), "", "", ""),
        ("floor: one read+write of every touched weight", ms(floor), "1.00× floor", "", ""),
        ("floor: the deltas' matmuls (up @ down, fp32)", ms(o["matmul"]), f"{o['matmul'] / floor:.2f}× floor", "", ""),
        ("floor + matmuls", ms(fmm), f"{fmm / floor:.2f}× floor", "", ""),
        ("(info) the read+write into freshly allocated memory, as any backup needs", ms(o["floor_alloc"]),
         f"{o['floor_alloc'] / floor:.2f}× floor", "", ""),
        ("`lib_lora.load` (read, check, decode)", ms(o["load"]),
         f"{o['load'] / o['d_load']:.2f}× diffusers' load (`lora_state_dict` + `load_lora_into_*`)" if has_d else "",
         "", ""),
        ("first apply, merge, fresh `Patcher` (cold factor cache)", f"{ms(o['first'])} (+ {ms(o['index'])} `Patcher()`)",
         f"{o['r_first']:.2f}× (floor+mm){best(o['m_first'])}; {o['r_first_alloc']:.2f}× (fresh-memory floor+mm)"
         f"{vs_d('vs_fuse', '`fuse_lora`')}",
         "≤ 2× (floor+mm)", yes(o["r_first"] <= 2, o["m_first"] <= 2)),
        ("first apply, merge (factor cache warm)", ms(o["first_warm"]),
         f"{o['r_warm']:.2f}× (floor+mm){best(o['m_warm'])}"
         f"{vs_d('vs_fuse_warm', '`fuse_lora`')}",
         "≤ 2× (floor+mm)", yes(o["r_warm"] <= 2, o["m_warm"] <= 2)),
        ("re-apply of the same set", f"{ms(o['again'])}, {o['again_written']} modules written",
         f"{o['r_again']:.3f}× floor; {o['again'] / o['first']:.4f}× first apply",
         "≈ 0: nothing written, < 2 % of a first apply",
         yes(o["again_written"] == 0 and o["again"] <= 0.02 * o["first"])),
        ("re-apply of the same stack of three", f"{ms(o['stack_again'])}, {o['stack_again_written']} modules written",
         f"{o['stack_again'] / floor:.3f}× floor; {o['stack_again'] / o['first']:.4f}× first apply",
         "≈ 0: nothing written, < 2 % of a first apply",
         yes(o["stack_again_written"] == 0 and o["stack_again"] <= 0.02 * o["first"])),
        ("change one weight in a stack of three (A: all 264, B: text encoder 72, C: UNet attn2 64; C's weight changes)",
         f"{ms(o['change'])}; {o['change_written']} modules rewritten, all of them C's "
         f"({o['c_count']})" if o["change_subset"] else f"{ms(o['change'])}; {o['change_written']} rewritten, "
         f"some outside C",
         f"{o['r_change']:.2f}× (floor+mm) of C's modules{best(o['m_change'])}; {o['change'] / floor:.3f}× full floor",
         "touches only that network's modules", yes(o["change_subset"] and o["change_written"] == o["c_count"])),
        ("restore", ms(o["restore"]),
         f"{o['r_rest']:.2f}× floor{best(o['m_rest'])}"
         f"{vs_d('vs_unfuse', '`unfuse_lora`')}", "", ""),
    ]
    if has_d:
        rows += [
            ("diffusers `fuse_lora` (UNet + text encoder, same weight tensors)",
             f"{ms(o['d_fuse'])} (first call: {ms(o['d_fuse_first'])})",
             f"{o['d_r_fuse']:.2f}× (floor+mm){best(o['d_m_fuse'])}", "", ""),
            ("diffusers `unfuse_lora` (not bit-exact: subtracts the delta again)",
             f"{ms(o['d_unfuse'])}, max error {o['d_roundtrip_err']:.1e}", f"{o['d_r_unfuse']:.2f}× floor{best(o['d_m_unfuse'])}", "", ""),
        ]
    else:
        rows.append(("diffusers reference", o.get("diffusers_error", "skipped"), "", "", ""))
    rows += [
        (f"extra memory, merge, on the weights' device ({o['device_note']})",
         f"peak +{mb(o['merge_dev_peak'])}, held +{mb(o['merge_dev_held'])}",
         f"peak {o['merge_dev_peak'] / o['layer_buffer']:.2f}× one layer's fp32 buffer + factors "
         f"({mb(o['layer_buffer'])})", "peak ≤ one layer's buffer, nothing held",
         yes(o["merge_dev_peak"] <= o["layer_buffer"] and o["merge_dev_held"] <= 0)),
        ("extra memory, merge, CPU RAM (resident)", f"peak +{mb(o['merge_ram_peak'])}, held +{mb(o['merge_ram_held'])} "
         f"(backups {mb(o['merge_backup'])}; fp32 factor copies held {mb(o['merge_cache'])})",
         f"held {o['merge_ram_held'] / o['touched_bytes']:.2f}× touched weights", "", ""),
        ("extra memory, bypass apply, on the weights' device", f"peak +{mb(o['bypass_dev_peak'])}, "
         f"held +{mb(o['bypass_dev_held'])}", "", "", ""),
        ("extra memory, bypass apply, CPU RAM (resident)", f"peak +{mb(o['bypass_ram_peak'])}, "
         f"held +{mb(o['bypass_ram_held'])} (backups {mb(o['bypass_backup'])})", "", "", ""),
    ]
    if "step_plain_dev_peak" in o:
        rows += [
            ("extra memory, bypass, first UNet step, on the weights' device",
             f"peak +{mb(o['step_bypass_dev_peak'])} (plain step +{mb(o['step_plain_dev_peak'])}), "
             f"held +{mb(o['step_bypass_dev_held'])}",
             f"peak {(o['step_bypass_dev_peak'] - o['step_plain_dev_peak']) / 1e6:+,.1f} MB over a plain step; held: "
             f"the UNet's fp32 factor copies", "", ""),
            ("extra memory, bypass, first UNet step, CPU RAM (resident)",
             f"peak +{mb(o['step_bypass_ram_peak'])} (plain step +{mb(o['step_plain_ram_peak'])}), "
             f"held +{mb(o['step_bypass_ram_held'])}", "", "", ""),
        ]
    if has_d:
        rows.append(("extra memory, diffusers' loaded LoRA (PEFT layers), CPU RAM", f"held +{mb(o['d_rss'])}", "", "", ""))
    if "fwd_plain" in o:
        rows += [
            ("UNet step, 64×64 latent, no network", ms(o["fwd_plain"]), "", "", ""),
            ("UNet step, bypass mode", ms(o["fwd_bypass"]),
             f"{o['fwd_share'] * 100:+.1f} % (time in the bypass hooks / rest of the same step, median of "
             f"{o['fwd_rounds']}; lowest {o['fwd_share_min'] * 100:+.1f} %); step vs step: {o['fwd_over'] * 100:+.1f} % "
             f"median of paired rounds, {o['fwd_over_min'] * 100:+.1f} % min/min", "≤ 5 %",
             yes(o["fwd_share"] <= 0.05, o["fwd_share_min"] <= 0.05)),
            ("UNet step, merge mode (a job's second step)", ms(o["fwd_merge"]),
             f"{o['fwd_over_merge'] * 100:+.1f} % (median of paired rounds); the first step after the apply: "
             f"{o['fwd_first_merge'] * 100:+.1f} % over the first after a restore",
             "= plain (the same operations; any difference is load noise)", ""),
        ]
    print()
    print(f"Machine: {info}")
    print()
    print("| metric | value | ratio | target | met? |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print(f"Ratios are medians of per-round ratios ({o['rounds']} rounds), each round measuring the floor right next "
          "to the operation (the machine is shared); [best-of] is the fastest run over the fastest floor (or the "
          "fastest diffusers run). diffusers runs in the same rounds on the same weight tensors (its UNet and text "
          "encoder hold our model's Parameters).")
    if "fwd_diff" in o:
        print(f"Bypass and merge UNet outputs agree to {o['fwd_diff']:.1e} (the LoRA changes the output by up to "
              f"{o['fwd_effect']:.1e}).")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
