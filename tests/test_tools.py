"""lib_lora.tools on the tiny real models: resize, merge (into a network and into a checkpoint) and extract,
checked against the engine's own merge of the source networks and against the SVD optimum."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import lib_lora
import lorafiles
import models
from helpers import te_out, unet_out
from lib_lora.errors import LoraError
from lib_lora.model_index import ModelIndex, checkpoint_name
from lib_lora.tools import (RankRule, as_modules, extract, merge_into_checkpoint, merge_networks, read_checkpoint,
                            resize, save_checkpoint, save_network)
from lib_lora.kohya_targets import kohya_targets
from lib_lora.tools.lowrank import factorize, singular_values
from lib_lora.train import TrainConfig
from lib_lora.train.trainable import TrainNetwork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd1():
    return models.sd_model("sd1", seed=0)


def merged(model, uses) -> torch.nn.Module:
    fresh = copy.deepcopy(model)
    res = lib_lora.Patcher(fresh).apply(uses, mode="merge")
    assert not res.errors, res.errors
    return fresh


def network(tmp_path, name, sd, metadata=None) -> lib_lora.Network:
    return lib_lora.load(lorafiles.save(tmp_path / f"{name}.safetensors", sd, metadata or {}))


def close(a: torch.nn.Module, b: torch.nn.Module, tol: float = 1e-5) -> None:
    torch.testing.assert_close(unet_out(a), unet_out(b), atol=tol, rtol=tol)
    torch.testing.assert_close(te_out(a), te_out(b), atol=tol, rtol=tol)


# kohya's rule (networks/lora.py, LyCORIS' kohya wrapper): the Linear / Conv2d layers inside modules of these classes
# (the ldm / sgm / open_clip names of the same blocks included); an open_clip MultiheadAttention gives q, k and v.
KOHYA_UNET = ("SpatialTransformer", "Transformer2DModel")
KOHYA_UNET_CONV = ("ResBlock", "Downsample", "Upsample", "ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP", "ResidualAttentionBlock")


def kohya_class_rule(model: torch.nn.Module, index: ModelIndex, convs: bool) -> set[str]:
    part_of = {name: key for key, (name, _m) in index.modules.items()}
    out = set()
    for cname, container in model.named_modules():
        cls = type(container).__name__
        if not (cls in KOHYA_UNET or cls in KOHYA_TE or (convs and cls in KOHYA_UNET_CONV)):
            continue
        for sub, layer in container.named_modules():
            key = part_of.get(checkpoint_name(f"{cname}.{sub}"))
            if key is None or (key[0] == "unet") != (cls not in KOHYA_TE):
                continue
            if isinstance(layer, torch.nn.MultiheadAttention):
                out |= {index.kohya_name(lib_lora.Target(*key, qkv)) for qkv in "qkv"}
            elif isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                out.add(index.kohya_name(lib_lora.Target(*key)))
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_extract_targets_are_the_trainers(family):
    """The name rules extraction and the trainer use pick exactly the layers kohya's class rules pick."""
    model = models.tiny_sdxl() if family == "sdxl" else models.sd_model(family, seed=0)
    index = ModelIndex(model)
    for conv in (None, 2):
        trained = set(TrainNetwork(model, TrainConfig(conv_dim=conv)).loras)
        assert {index.kohya_name(t) for t in kohya_targets(index, convs=bool(conv))} == trained
        assert kohya_class_rule(model, index, convs=bool(conv)) == trained


def test_factorize_is_the_svd_optimum_and_rank_rules():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(24, 3, 3, 3, generator=g)
    s = torch.linalg.svdvals(d.reshape(24, -1))
    up, down, kept = factorize(d, RankRule(rank=4))
    assert up.shape == (24, 4, 1, 1) and down.shape == (4, 3, 3, 3)
    err = (d.reshape(24, -1) - up.reshape(24, 4) @ down.reshape(4, -1)).norm() ** 2
    torch.testing.assert_close(err, (s[4:] ** 2).sum(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(kept), ((s[:4] ** 2).sum() / (s ** 2).sum()).sqrt(), rtol=1e-5, atol=0)
    assert factorize(d, RankRule(rank=4, conv_rank=0)) is None
    low = torch.randn(300, 6, generator=g) @ torch.randn(6, 500, generator=g)  # the randomized path
    up, down, kept = factorize(low, RankRule(rank=8))
    torch.testing.assert_close(up @ down, low, atol=1e-3, rtol=0)
    assert up.shape == (300, 8) and kept > 0.99999
    flat = torch.randn(300, 32, generator=g) @ torch.randn(32, 500, generator=g)  # rank 32 > 8 + 10: the range grows
    up, down, _ = factorize(flat, RankRule(rank=8))
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    torch.testing.assert_close(up @ down, (u[:, :8] * s[:8]) @ vh[:8], atol=2e-3, rtol=0)
    dense = torch.randn(200, 400, generator=g)  # full rank: the full SVD
    up, down, _ = factorize(dense, RankRule(rank=20))
    optimum = (torch.linalg.svdvals(dense)[20:] ** 2).sum()
    torch.testing.assert_close((dense - up @ down).norm() ** 2, optimum, rtol=1e-4, atol=0)
    torch.testing.assert_close(singular_values(dense), torch.linalg.svdvals(dense), atol=1e-3, rtol=1e-4)
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1])
    assert RankRule(8, dynamic="sv_ratio", dynamic_param=10).rank_for(s, False) == 3  # s ≥ 10/10
    assert RankRule(8, dynamic="sv_cumulative", dynamic_param=0.9).rank_for(s, False) == 2  # 15/16.6 ≥ 0.9
    assert RankRule(8, dynamic="sv_fro", dynamic_param=0.99).rank_for(s, False) == 2  # √(125/126.26)
    assert RankRule(1, dynamic="sv_fro", dynamic_param=0.99).rank_for(s, False) == 1  # capped at the rank
    with pytest.raises(LoraError, match="dynamic method 'svd' is unknown"):
        RankRule(4, dynamic="svd", dynamic_param=1.0)


def test_resize_full_rank_reproduces_and_lower_rank_keeps_most(sd1, tmp_path):
    net = network(tmp_path, "src", lorafiles.random_kohya_lora(sd1, rank=4, alpha=2.0, seed=1),
                  {"ss_network_dim": "4", "ss_training_comment": "mine", "ss_output_name": "src"})
    want = merged(sd1, [lib_lora.Use(net)])
    full = resize(net, sd1, RankRule(rank=4), precision="fp32")
    assert set(full.ranks.values()) == {4} and min(full.kept.values()) > 0.99999 and not full.skipped
    path = str(tmp_path / "full.safetensors")
    save_network(path, full)
    again = lib_lora.load(path)
    assert again.format == "kohya" and again.base_model == "sd1" and not again.unmatched
    assert len(again.modules) == len(net.modules)
    close(merged(sd1, [lib_lora.Use(again)]), want)
    md = again.metadata
    assert md["ss_network_dim"] == "4" and md["ss_output_name"] == "full"  # its own alias, not the source's
    assert md["ss_training_comment"] == "mine; dimension is resized from 4 to rank 4"
    assert md["sshs_model_hash"] == lib_lora.hashes.addnet_hash(path)
    small = resize(net, sd1, RankRule(rank=4, dynamic="sv_fro", dynamic_param=0.8))
    assert min(small.ranks.values()) < 4 and min(small.kept.values()) >= 0.8 - 1e-6
    assert small.metadata["ss_network_dim"] == "Dynamic" and "ss_network_args" not in small.metadata


def test_resize_loha_to_a_lora(sd1, tmp_path):
    """A LoHa's delta has rank up to r²: at that rank the LoRA is the same network."""
    sd = lorafiles.random_kohya_lora(sd1, rank=2, seed=2, conv=False)
    net = network(tmp_path, "loha", lorafiles.as_loha(sd, seed=3))
    assert set(net.kind_counts) == {"loha"}
    out = resize(net, sd1, RankRule(rank=4), precision="fp32")
    path = str(tmp_path / "loha-as-lora.safetensors")
    save_network(path, out)
    close(merged(sd1, [lib_lora.Use(lib_lora.load(path))]), merged(sd1, [lib_lora.Use(net)]))


def test_merge_networks_equals_the_stack(sd1, tmp_path):
    a = network(tmp_path, "a", lorafiles.random_kohya_lora(sd1, rank=2, seed=4))
    b = network(tmp_path, "b", lorafiles.random_kohya_lora(sd1, rank=3, seed=5))
    res = merge_networks([(a, 0.7), (b, -0.4)], sd1, RankRule(rank=5), precision="fp32")
    path = str(tmp_path / "ab.safetensors")
    save_network(path, res)
    got = lib_lora.load(path)
    assert json.loads(got.metadata["ss_merged_from"])[1] == {"name": "b", "weight": -0.4, "sshs_model_hash": ""}
    close(merged(sd1, [lib_lora.Use(got)]), merged(sd1, [lib_lora.Use(a, 0.7, 0.7), lib_lora.Use(b, -0.4, -0.4)]))


def test_merge_into_checkpoint_is_the_engines_merge(sd1, tmp_path):
    net = network(tmp_path, "c", lorafiles.random_kohya_lora(sd1, rank=4, seed=6))
    plain = models.sd_model("sd1", seed=0, wrapped=False)
    tensors = {k: v.clone() for k, v in plain.state_dict().items()}
    res = merge_into_checkpoint([(net, 0.8)], tensors)
    assert len(res.matched) == len(net.modules) and not res.skipped
    path = str(tmp_path / "merged.safetensors")
    save_checkpoint(path, tensors, {"note": "x"})
    loaded, md = read_checkpoint(path)
    result = models.sd_model("sd1", seed=0)
    result_plain = copy.deepcopy(result)
    missing = [k for k in loaded if k not in plain.state_dict()]
    assert not missing and md == {"note": "x"}
    result.load_state_dict({k: loaded[checkpoint_name(k)] for k in result.state_dict()})
    close(result, merged(result_plain, [lib_lora.Use(net, 0.8, 0.8)]))
    sdxl_net = network(tmp_path, "xl", lorafiles.random_kohya_lora(models.sdxl_skeleton(), rank=2, sdxl=True))
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(LoraError, match="made for SDXL, but the loaded model is SD1.x"):
        merge_into_checkpoint([(sdxl_net, 1.0)], tensors)
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)


def test_as_modules_indexes_like_the_model(sd1):
    for family in ("sd1", "sd2"):
        plain = models.sd_model(family, seed=0, wrapped=False)
        tree = as_modules(dict(plain.state_dict()))
        a, b = ModelIndex(tree), ModelIndex(plain)
        assert a.family == b.family == family
        kinds = {k: models.normalized_type(type(m).__name__) for k, (_n, m) in b.modules.items()
                 if not isinstance(m, torch.nn.GroupNorm)}  # 1-D norms are all LayerNorm in a state dict
        assert {k: type(m).__name__ for k, (_n, m) in a.modules.items() if k in kinds} == kinds


def test_extract_recovers_a_merged_network(sd1, tmp_path):
    lora = lorafiles.attention_lora(sd1, rank=3, seed=7, dtype=torch.float32)  # kohya's layers only
    unet_only = {k: v for k, v in lora.items() if k.startswith("lora_unet_")}
    net = network(tmp_path, "u", unet_only)
    tuned = merged(sd1, [lib_lora.Use(net)])
    res = extract(sd1, tuned, RankRule(rank=3), precision="fp32")
    assert any("te: largest change" in s for s in res.skipped)  # the text encoder did not change
    path = str(tmp_path / "extracted.safetensors")
    save_network(path, res)
    got = lib_lora.load(path)
    assert {t.part for t in got.modules} == {"unet"} and got.metadata["ss_network_dim"] == "3"
    close(merged(sd1, [lib_lora.Use(got)]), tuned, tol=2e-5)


def test_cli_resize_merge_extract(sd1, tmp_path):
    ckpt = str(tmp_path / "base.safetensors")
    save_checkpoint(ckpt, dict(models.sd_model("sd1", seed=0, wrapped=False).state_dict()))
    src = lorafiles.save(tmp_path / "n.safetensors", lorafiles.random_kohya_lora(sd1, rank=4, seed=8), {})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "lib_lora", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    out = run("resize", src, str(tmp_path / "r.safetensors"), "--model", ckpt, "--rank", "2")
    assert out.returncode == 0, out.stderr
    assert "modules, rank 2..2" in out.stdout and lib_lora.load(str(tmp_path / "r.safetensors")).rank == 2
    out = run("merge", str(tmp_path / "m.safetensors"), "--model", ckpt, "--rank", "4", f"{src}:0.5",
              str(tmp_path / "r.safetensors"))
    assert out.returncode == 0, out.stderr
    out = run("merge", str(tmp_path / "ckpt.safetensors"), "--model", ckpt, "--into-checkpoint", f"{src}:1")
    assert out.returncode == 0 and "merged into the checkpoint" in out.stdout, out.stderr
    out = run("extract", str(tmp_path / "x.safetensors"), "--base", ckpt, "--tuned", str(tmp_path / "ckpt.safetensors"),
              "--rank", "4", "--conv-rank", "4")
    assert out.returncode == 0, out.stderr
    extracted = lib_lora.load(str(tmp_path / "x.safetensors"))
    assert any(t.path.endswith("in_layers_2") for t in extracted.modules)  # the ResBlocks' 3x3 convs too
    assert json.loads(extracted.metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    bad = run("resize", src, str(tmp_path / "r.txt"), "--model", ckpt, "--rank", "2")
    assert bad.returncode == 2 and "output must be a .safetensors file" in bad.stderr
    bad = run("merge", str(tmp_path / "m2.safetensors"), "--model", ckpt, f"{src}:lots")
    assert bad.returncode == 2 and "weight 'lots'" in bad.stderr


def test_tools_report_each_module_and_stop_when_asked(sd1, tmp_path):
    """progress(done, total) before every module's SVD; raising in it stops the tool before anything exists to
    be written (the WebUI's Interrupt does that)."""
    a = network(tmp_path, "pa", lorafiles.random_kohya_lora(sd1, rank=2, seed=8))
    calls = []
    res = resize(a, sd1, RankRule(rank=1), progress=lambda done, total: calls.append((done, total)))
    n = len(res.ranks)
    assert calls == [(i, n) for i in range(n)]
    merged_calls = []
    merge_networks([(a, 1.0)], sd1, RankRule(rank=1), progress=lambda d, t: merged_calls.append(d))
    assert merged_calls == list(range(n))

    class Stop(Exception):
        pass

    def stop_at_three(done, total):
        if done == 3:
            raise Stop

    for tool in (lambda p: resize(a, sd1, RankRule(rank=1), progress=p),
                 lambda p: extract(sd1, merged(sd1, [lib_lora.Use(a)]), RankRule(rank=1), progress=p)):
        with pytest.raises(Stop):
            tool(stop_at_three)
    assert os.listdir(tmp_path) == ["pa.safetensors"]
