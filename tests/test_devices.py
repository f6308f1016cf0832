"""Weights in the dtypes the WebUI stores them in: FP8 (its "FP8 weight" option, with and without the fp16
cache), fp16 and bf16; merges computed in fp32 and written back in the weight's dtype, restored bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lib_lora
import lorafiles
import models
from helpers import same_state, state, unet_out
from lib_lora.devices import BackupPlace, compute_dtype

FP8 = getattr(torch, "float8_e4m3fn", None)
needs_fp8 = pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")


def fp8_model(seed: int, cache: bool) -> nn.Module:
    """What the WebUI does with FP8 weight on (modules/sd_models.py): every Linear/Conv2d stored as float8_e4m3fn,
    with an fp16 copy of weight and bias when *Cache FP16 weight for LoRA* is on."""
    m = models.sd_model("sd1", seed=seed)
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            if cache:
                mod.fp16_weight = mod.weight.detach().clone().half()
                if mod.bias is not None:
                    mod.fp16_bias = mod.bias.detach().clone().half()
            mod.to(FP8)
    return m


def fp16_cache(module: nn.Module, pname: str):
    return getattr(module, "fp16_" + pname, None)


def lora_delta(net: lib_lora.Network, target_path: str, shape) -> torch.Tensor:
    adapter = next(a for t, a in net.modules.items() if t.part == "unet" and t.path == target_path)
    return adapter.delta(torch.zeros(shape), 1.0)[0]


@needs_fp8
@pytest.mark.parametrize("cache", [False, True])
def test_fp8_merge_is_computed_from_the_best_copy_and_restored_exactly(cache):
    m = fp8_model(seed=21, cache=cache)
    ref = state(m)
    net = lib_lora.from_state_dict(lorafiles.random_kohya_lora(m, rank=2, seed=1))
    p = lib_lora.Patcher(m, precise_weight=fp16_cache if cache else None)
    path = "input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    layer = m.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    basis = (layer.fp16_weight if cache else layer.weight.detach().clone()).float()
    for w in (0.7, 0.3, 0.7):  # a changed weight is recomputed from the basis, never compounded
        p.apply([lib_lora.Use(net, te=w, unet=w)])
        want = (basis + w * lora_delta(net, path, layer.weight.shape)).to(FP8)
        assert layer.weight.dtype == FP8
        assert torch.equal(layer.weight.view(torch.uint8), want.view(torch.uint8))
    p.restore()
    assert same_state(m, ref)


@needs_fp8
@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_fp8_layers_run_under_the_webuis_cpu_autocast(mode):
    m = fp8_model(seed=22, cache=False)
    ref = state(m)
    net = lib_lora.from_state_dict(lorafiles.random_kohya_lora(m, rank=2, seed=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what modules/devices.py autocast() gives for FP8 on CPU
        base = unet_out(m)
        p = lib_lora.Patcher(m)
        p.apply([lib_lora.Use(net)], mode=mode)
        patched = unet_out(m)
        p.restore()
        assert torch.equal(unet_out(m), base)
    assert (patched.float() - base.float()).abs().max() > 1e-3
    assert same_state(m, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_half_weights_merge_in_fp32_and_restore_exactly(dtype, mode):
    m = models.sd_model("sd1", seed=23).to(dtype)
    ref = state(m)
    net = lib_lora.from_state_dict(lorafiles.random_kohya_lora(m, rank=2, seed=3, dtype=dtype))
    p = lib_lora.Patcher(m)
    res = p.apply([lib_lora.Use(net)], mode=mode)
    assert not res.skipped and not res.errors
    if mode == "merge":
        layer = m.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
        path = "input_blocks_1_1_transformer_blocks_0_attn1_to_q"
        want = (ref["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].float()
                + lora_delta(net, path, layer.weight.shape)).to(dtype)
        assert torch.equal(layer.weight, want)
    p.restore()
    assert same_state(m, ref)


def test_compute_dtype_is_decided_in_one_place():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype(torch.float16, cpu) == torch.float32  # the WebUI's torch 2.1 has no CPU half matmul
    assert compute_dtype(torch.float16, cuda) == torch.float16
    assert compute_dtype(torch.float32, cpu) == torch.float32
    if FP8 is not None:
        assert compute_dtype(FP8, cuda) == torch.float32


def test_backups_go_where_the_place_says():
    w = torch.randn(4, 4)
    assert BackupPlace().backup(w).device.type == "cpu"
    assert BackupPlace(keep_on_device=True).target(w) == w.device
    copy = BackupPlace().backup(w)
    assert torch.equal(copy, w) and copy.data_ptr() != w.data_ptr()


class OffHeap(BackupPlace):
    """Backups in numpy's memory, which torch's allocator (and its profiler) never sees: on a CPU-only machine the
    stand-in for system RAM beside a GPU's weights, so what a merge allocates beside the weights shows on its own."""

    def backup(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(t.detach().numpy().copy())


def torch_allocations(fn) -> tuple[int, int]:
    """(peak, held at the end) of the bytes torch allocates on the CPU while ``fn`` runs (its profiler's records)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    now = peak = 0
    for e in events:
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak, now


# torch 2.1's profiler leaves some frees of a merge unrecorded (counted "held"), although the tensors alive after the
# merge are the same ones, of the same sizes, under torch 2.1.2 and 2.14 (counted with gc); its figures are not usable.
@pytest.mark.skipif(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 2),
                    reason="torch 2.1's profiler does not record every free")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_merge_holds_nothing_beside_the_weights_but_one_layers_buffer(dtype):
    """With backups elsewhere (system RAM when the weights are on a GPU), the extra memory on the weights' device
    while a merge is applied is at most one layer's fp32 work buffer and that layer's factors; none is kept."""
    m = models.sd_model("sd1", seed=24).to(dtype)
    ref = state(m)
    net = lib_lora.from_state_dict(lorafiles.random_kohya_lora(m, rank=4, seed=4, dtype=torch.float16))
    p = lib_lora.Patcher(m, backups=OffHeap())
    touched = p.plan([lib_lora.Use(net)]).modules.values()
    layer = max(mod.weight.numel() + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)
                for mod in touched) * 4
    factors = max(sum(t.numel() for t in a.w.values()) for a in net.modules.values()) * 4
    peak, held = torch_allocations(lambda: p.apply([lib_lora.Use(net)]))
    assert p.backup_bytes() > 10 * layer  # the backups exist (elsewhere)
    assert held <= 0, held
    assert peak <= layer + factors, (peak, layer, factors)
    p.restore()
    assert same_state(m, ref)
