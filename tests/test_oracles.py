"""Oracle tests: lib_lora against libraries nobody here wrote.

For each case a library (lycoris-lora, peft + diffusers) writes a LoRA file for a diffusers UNet /
transformers CLIPTextModel that hold exactly the weights of our tiny ldm-based SD model, and its own
forward (the network applied to the model) gives the reference outputs.  lib_lora then loads the file
and patches our model (checkpoint naming, ldm UNet) in merge and bypass mode; outputs must agree to
1e-5 (relative to the output scale), the patch must change the outputs by far more than that, every
module of the file must be matched (nothing skipped), and restore() must give back every parameter and
buffer bit for bit.

The ldm <-> diffusers correspondence is diffusers' own (single_file_utils), checked first.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

for _library in ("diffusers", "peft", "lycoris"):  # the references; the Python 3.10 run has none of them
    pytest.importorskip(_library)

import models as M  # noqa: E402
import oracles as O  # noqa: E402

MODES = ("merge", "bypass")
REL_TOL = 1e-5
#: the patch must move each checked output by at least this many tolerances (else the test is vacuous)
MIN_EFFECT = 100.0


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The models are tiny: one intra-op thread is as fast, and far faster when the 2 shared cores are
    busy (OpenMP threads spinning against other processes made this file ~5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# shared base models


@dataclass
class Base:
    family: str
    ours: torch.nn.Module  # sd_model(family, wrapped=True): our naming
    dunet: torch.nn.Module  # diffusers UNet2DConditionModel with the same weights
    te: torch.nn.Module | None  # the sd1 CLIPTextModel (same object naming on both sides)
    inp: O.Inputs
    out_ldm: torch.Tensor
    out_dif: torch.Tensor
    out_te: torch.Tensor | None


_BASES: dict[str, Base] = {}


def base(family: str) -> Base:
    if family not in _BASES:
        torch.manual_seed(0)
        ours = M.sd_model(family, wrapped=True, seed=0)
        ldm = ours.model.diffusion_model
        dunet = O.diffusers_unet_like(ldm, family)
        te = ours.get_submodule(O.sd1_text_path(ours)) if family == "sd1" else None
        inp = O.fixed_inputs(family)
        _BASES[family] = Base(
            family, ours, dunet, te, inp,
            out_ldm=O.run_ldm_unet(ldm, inp),
            out_dif=O.run_diffusers_unet(dunet, inp),
            out_te=O.run_clip_text(te, inp) if te is not None else None,
        )
    return _BASES[family]


# ---------------------------------------------------------------------------------------------
# 0. the oracle's own foundation: diffusers' conversion of our ldm UNet is the same function


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_unet_matches_ldm(family):
    b = base(family)
    tol = O.tolerance(b.out_ldm, REL_TOL)
    diff = O.max_abs_diff(b.out_ldm, b.out_dif)
    assert diff <= tol, f"{family}: diffusers UNet (diffusers' own config + converter) differs from ldm by {diff}"
    # a different timestep / context must matter (the comparison is not trivially of zeros)
    assert float(b.out_ldm.abs().max()) > 1e-2
    cfg = O.diffusers_unet_config(family)
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["use_linear_projection"] == (family == "sd2")
    assert cfg["block_out_channels"] == [M.UNET_CONFIGS[family]["model_channels"] * m
                                         for m in M.UNET_CONFIGS[family]["channel_mult"]]


# ---------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    id: str
    source: str  # "lycoris" | "peft"
    family: str = "sd1"
    algo: str = "lora"
    kw: dict[str, Any] = field(default_factory=dict)
    std: float = 0.1
    te: bool = True  # also patch the text encoder
    te_mult: float = 1.0
    unet_mult: float = 1.0
    allow_full_refusal: bool = False  # the engine may refuse the whole file (LoraError, or all skipped)
    xfail: str | None = None


def lyco(id_: str, algo: str, std: float, **kw: Any) -> Case:
    opts = {k: kw.pop(k) for k in ("family", "te", "te_mult", "unet_mult", "allow_full_refusal", "xfail")
            if k in kw}
    return Case(id_, "lycoris", algo=algo, kw=kw, std=std, **opts)


def peft(id_: str, std: float = 0.1, **kw: Any) -> Case:
    opts = {k: kw.pop(k) for k in ("family", "te") if k in kw}
    return Case(id_, "peft", kw=kw, std=std, **opts)


CASES = [
    # --- LoRA / LoCon (kohya keys lora_up / lora_down / alpha, conv 3x3 via conv_dim)
    lyco("locon", "lora", 0.2, conv_dim=4, conv_alpha=1),
    lyco("locon_tucker", "lora", 0.2, conv_dim=4, conv_alpha=2, use_tucker=True),
    lyco("lora_scalar", "lora", 0.2, use_scalar=True),
    lyco("lora_rslora", "lora", 0.2, rs_lora=True),
    lyco("lora_dora", "lora", 0.2, dora_wd=True),
    lyco("lora_dora_wd_in", "lora", 0.2, dora_wd=True, wd_on_output=False),
    lyco("locon_strengths", "lora", 0.2, conv_dim=4, conv_alpha=1, te_mult=0.5, unet_mult=1.5),
    lyco("norm", "lora", 0.1, train_norm=True),
    # --- LoHa
    lyco("loha", "loha", 0.3),
    lyco("loha_tucker", "loha", 0.3, use_tucker=True),
    lyco("loha_dora", "loha", 0.3, dora_wd=True),
    lyco("loha_strengths", "loha", 0.3, te_mult=1.5, unet_mult=0.5),
    # --- LoKr
    lyco("lokr", "lokr", 0.2),
    lyco("lokr_factor4_lowrank", "lokr", 0.3, dim=2, factor=4),
    lyco("lokr_decompose_both", "lokr", 0.3, dim=2, factor=8, decompose_both=True),
    lyco("lokr_full_matrix", "lokr", 0.2, full_matrix=True),
    lyco("lokr_tucker", "lokr", 0.3, dim=2, factor=4, use_tucker=True),
    lyco("lokr_unbalanced", "lokr", 0.3, dim=2, factor=4, unbalanced_factorization=True),
    lyco("lokr_dora", "lokr", 0.2, dora_wd=True),
    lyco("lokr_strengths", "lokr", 0.2, te_mult=0.5, unet_mult=0.5),
    # --- IA3
    lyco("ia3", "ia3", 0.2),
    lyco("ia3_preset", "ia3", 0.2, preset="ia3"),  # k, v (out) + ff.net.2 / mlp.fc2 (on_input)
    # --- Full (diff / diff_b)
    lyco("full", "full", 0.05),
    # --- GLoRA
    lyco("glora", "glora", 0.2),
    # --- OFT
    lyco("diag_oft", "diag-oft", 0.1),
    lyco("diag_oft_rescaled", "diag-oft", 0.1, rescaled=True),
    lyco("diag_oft_constraint", "diag-oft", 0.1, constraint=1e-3),
    lyco("boft", "boft", 0.1),
    lyco("boft_rescaled", "boft", 0.1, rescaled=True),
    # --- DyLoRA (saved as lora_up / lora_down; conv up saved 2-D)
    lyco("dylora", "dylora", 0.2, block_size=1),
    # --- T-LoRA: the file lacks the frozen SVD base (base_q/base_p/base_lambda), so the delta is
    #     P diag(l) Q - (rank-r SVD truncation of W); refusing the file is acceptable, silently
    #     mis-applying it is not.
    lyco("tlora", "tlora", 0.1, preset="attn", allow_full_refusal=True),
    # --- SD2 topology (Linear proj_in/out, num_head_channels), UNet only
    lyco("sd2_locon", "lora", 0.2, conv_dim=4, conv_alpha=1, family="sd2", te=False),
    lyco("sd2_loha", "loha", 0.3, family="sd2", te=False),
    # --- peft / diffusers
    peft("peft_lora", rank=4),
    peft("peft_lora_alpha_metadata", rank=4, alpha=8.0, alpha_metadata=True),
    peft("peft_dora", rank=4, dora=True),
    peft("peft_diffusers_layout", rank=4, layout="diffusers"),
    peft("peft_kohya_layout", rank=4, layout="kohya"),
    peft("sd2_peft_lora", rank=4, family="sd2", te=False),
]


def _params(cases):
    out = []
    for c in cases:
        marks = [pytest.mark.xfail(reason=c.xfail, strict=False)] if c.xfail else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


# ---------------------------------------------------------------------------------------------
# the oracle run


def _make_reference(case: Case, b: Base, path) -> tuple[torch.Tensor, torch.Tensor | None, set[str]]:
    """Write the file with the library; return its own patched outputs and the file's module names."""
    ref_unet = copy.deepcopy(b.dunet)
    ref_te = copy.deepcopy(b.te) if (case.te and b.te is not None) else None
    if case.source == "lycoris":
        kw = dict(case.kw)
        preset = kw.pop("preset", "full")
        dim = kw.pop("dim", 4)
        alpha = kw.pop("alpha", 2.0)
        O.make_lycoris_file(path, case.algo, ref_unet, ref_te, seed=7, dim=dim, alpha=alpha, std=case.std,
                            preset=preset, te_multiplier=case.te_mult, unet_multiplier=case.unet_mult,
                            family=case.family, **kw)
        modules = O.lycoris_file_modules(path)
    else:
        O.make_peft_file(path, ref_unet, ref_te, seed=7, std=case.std, **case.kw)
        modules = (O.lycoris_file_modules(path) if case.kw.get("layout") == "kohya"
                   else O.peft_file_modules(path))
    ref_u = O.run_diffusers_unet(ref_unet, b.inp)
    ref_t = O.run_clip_text(ref_te, b.inp) if ref_te is not None else None
    return ref_u, ref_t, modules


def _check_case(case: Case, tmp_path) -> None:
    import lib_lora

    b = base(case.family)
    path = tmp_path / f"{case.id}.safetensors"
    t0 = time.perf_counter()
    ref_u, ref_t, file_modules = _make_reference(case, b, path)
    t_ref = time.perf_counter() - t0

    # the oracle itself must show a real effect, else the comparison is vacuous
    tol_u = O.tolerance(ref_u, REL_TOL)
    eff_u = O.max_abs_diff(ref_u, b.out_dif)
    assert eff_u > MIN_EFFECT * tol_u, f"{case.id}: reference UNet barely changed ({eff_u:.3g}); raise std"
    tol_t = eff_t = None
    if ref_t is not None:
        tol_t = O.tolerance(ref_t, REL_TOL)
        eff_t = O.max_abs_diff(ref_t, b.out_te)
        assert eff_t > MIN_EFFECT * tol_t, f"{case.id}: reference TE barely changed ({eff_t:.3g}); raise std"

    ours = copy.deepcopy(b.ours)
    unet = ours.model.diffusion_model
    te = ours.get_submodule(O.sd1_text_path(ours)) if case.family == "sd1" else None
    snap = O.snapshot(ours)
    try:
        net = lib_lora.load(path)
    except lib_lora.LoraError as e:
        if case.allow_full_refusal:  # honest refusal at load time
            return
        raise AssertionError(f"{case.id}: lib_lora.load refused the file: {e}") from e

    problems: list[str] = []
    report: list[str] = [f"file modules: {len(file_modules)}; reference built in {t_ref:.2f}s; "
                         f"effect unet {eff_u:.3g} (tol {tol_u:.2g})"
                         + (f", te {eff_t:.3g} (tol {tol_t:.2g})" if eff_t is not None else "")]
    for mode in MODES:
        patcher = lib_lora.Patcher(ours)
        res = patcher.apply([lib_lora.Use(net, te=case.te_mult, unet=case.unet_mult)], mode=mode)
        out_u = O.run_ldm_unet(unet, b.inp)
        out_t = O.run_clip_text(te, b.inp) if ref_t is not None else None
        patcher.restore()

        matched = set(res.matched)
        skipped = dict(res.skipped)
        errors = list(getattr(res, "errors", []) or [])
        refused = bool(skipped) and not matched
        report.append(f"[{mode}] matched {len(matched)}, skipped {len(skipped)}, errors {len(errors)}")
        if refused and case.allow_full_refusal:
            # honest refusal: every module reported, nothing changed
            if O.max_abs_diff(out_u, b.out_ldm) != 0.0:
                problems.append(f"[{mode}] everything skipped but the UNet output changed")
            report.append(f"[{mode}] refused: {O.describe(skipped)}")
        else:
            if skipped:
                problems.append(f"[{mode}] skipped {len(skipped)}: {O.describe(skipped)}")
            if errors:
                problems.append(f"[{mode}] errors: {O.describe(errors)}")
            if len(matched) != len(file_modules):
                problems.append(f"[{mode}] matched {len(matched)} modules, the file has {len(file_modules)}")
            du = O.max_abs_diff(out_u, ref_u)
            if not du <= tol_u:
                problems.append(f"[{mode}] UNet differs from reference by {du:.3g} (tol {tol_u:.2g}, "
                                f"effect {eff_u:.3g})")
            if out_t is not None:
                dt = O.max_abs_diff(out_t, ref_t)
                if not dt <= tol_t:
                    problems.append(f"[{mode}] TE differs from reference by {dt:.3g} (tol {tol_t:.2g}, "
                                    f"effect {eff_t:.3g})")

        bad = O.snapshot_diff(ours, snap)
        if bad:
            problems.append(f"[{mode}] after restore() {len(bad)} tensors differ: {O.describe(bad)}")
        after_u = O.run_ldm_unet(unet, b.inp)
        if not torch.equal(after_u, b.out_ldm):
            problems.append(f"[{mode}] after restore() UNet output differs from the unpatched one by "
                            f"{O.max_abs_diff(after_u, b.out_ldm):.3g}")
        if te is not None:
            after_t = O.run_clip_text(te, b.inp)
            if not torch.equal(after_t, b.out_te):
                problems.append(f"[{mode}] after restore() TE output differs by {O.max_abs_diff(after_t, b.out_te):.3g}")

    assert not problems, f"{case.id}:\n  " + "\n  ".join(problems + ["--"] + report)


@pytest.mark.parametrize("case", _params(CASES))
def test_oracle(case, tmp_path):
    _check_case(case, tmp_path)


def test_diffusers_loader_agrees_with_peft_on_alpha_metadata(tmp_path):
    """The oracle's claim for ``peft_lora_alpha_metadata``: a diffusers-saved PEFT file whose
    lora_alpha != r carries the scale only in the header's ``lora_adapter_metadata``, and diffusers'
    own loader applies it (its output equals peft's producer-side reference)."""
    from diffusers import StableDiffusionPipeline

    b = base("sd1")
    case = next(c for c in CASES if c.id == "peft_lora_alpha_metadata")
    path = tmp_path / "alpha_meta.safetensors"
    ref_u, _ref_t, _mods = _make_reference(case, b, path)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    assert alphas is None and metadata["unet.lora_alpha"] == 8.0 and metadata["unet.r"] == 4
    unet = copy.deepcopy(b.dunet)
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=None, unet=unet, metadata=metadata)
    out = O.run_diffusers_unet(unet, b.inp)
    assert O.max_abs_diff(out, ref_u) <= O.tolerance(ref_u, REL_TOL)
