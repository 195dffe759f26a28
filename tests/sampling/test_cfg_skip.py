"""Late-scale CFG skipping (``cfg_skip``): the last K scales run the conditional half only."""
from dataclasses import replace

import pytest
import torch

from tiny_var import agree as _agree, phase_flops, tiny_var, tiny_vae
from varcore.sampling.code import CoDeSampler
from varcore.sampling.var import VARSampler

PATCH_NUMS = (1, 2, 3, 4, 5)


def _vae(seed=0):
    return tiny_vae(PATCH_NUMS, seed)


def _var(vae, depth=2, width=64, seed=1):
    return tiny_var(vae, depth, width, seed).eval()


@pytest.fixture(scope="module")
def var():
    return _var(_vae())


LABELS = torch.tensor([1, 4, 7])
KW = dict(g_seed=3, cfg=3.0, top_k=20, output="tokens")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neutral_setting_keeps_the_tokens(var, dtype):
    sampler = VARSampler(var, dtype=dtype)
    plain = sampler.sample(3, LABELS, **KW)
    assert all(torch.equal(a, b) for a, b in zip(sampler.sample(3, LABELS, cfg_skip=0, **KW), plain))
    if dtype == torch.float32:  # the official tokens
        _, ref = var.autoregressive_infer_cfg(3, LABELS, g_seed=3, cfg=3.0, top_k=20, return_idx_Bl=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, ref))


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("more_smooth", [False, True])
def test_skipped_scales_draw_from_the_conditional_logits(var, K, more_smooth):
    """The scales before the last K are the plain run's, bit for bit (same work, same random numbers); the last K
    draw what a run with guidance weight 0 there draws (the conditional logits), computed on B rows instead of 2B."""
    sampler = VARSampler(var)
    SN = len(PATCH_NUMS)
    skipped = sampler.sample(3, LABELS, cfg_skip=K, more_smooth=more_smooth, **KW)
    plain = sampler.sample(3, LABELS, more_smooth=more_smooth, **KW)
    assert all(torch.equal(a, b) for a, b in zip(skipped[:SN - K], plain[:SN - K]))
    # the reference: both halves run, the mix weight is 0 at the last K scales
    opts = [o if o.si < SN - K else replace(o, cfg_t=0.0)
            for o in sampler.options(3.0, 20, 0.0, 1.0, more_smooth)]
    gens = [torch.Generator().manual_seed(3)]
    with sampler.eval_mode(), torch.no_grad():
        ref, _, _ = sampler.run(LABELS, gens, opts, "the reference")
    assert all(torch.equal(a, b) for a, b in zip(skipped[:SN - K], ref[:SN - K]))
    # B rows instead of 2B can change a GEMM's blocking, so allow a rare near-tie; a wrong half or wrong cache rows
    # would agree on a small fraction of the tokens
    assert _agree(skipped[SN - K:], ref[SN - K:]) > 0.97
    assert _agree(skipped[SN - K:], plain[SN - K:]) < 0.9  # guidance did change the draws


def _flops_per_phase(sampler, **kw):
    """Counted FLOPs of each (phase, scale) of one call (the GEMMs of the transformer, the head and the quantiser)."""
    return phase_flops(sampler, LABELS, **KW, **kw)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skipped_scales_cost_half_the_flops(var, K, dtype):
    """The forward pass of a skipped scale does exactly half the GEMM FLOPs (B rows of 2B). The head: float32
    (the official arithmetic) runs it on both halves, so a skipped scale's draw saves the unconditional half's
    2 * B * l * C * V; the other dtypes mix the halves before the head, which runs on B rows either way. Scales
    before the last K are unchanged."""
    sampler = VARSampler(var, dtype=dtype)
    plain, skipped = _flops_per_phase(sampler), _flops_per_phase(sampler, cfg_skip=K)
    SN, B = len(PATCH_NUMS), len(LABELS)
    assert plain.keys() == skipped.keys()
    for (phase, si), f in plain.items():
        saved = 0
        if si >= SN - K and phase == "forward":
            saved = f // 2
        elif si >= SN - K and dtype == torch.float32:
            saved = 2 * B * PATCH_NUMS[si] ** 2 * var.C * var.V
        assert f > 0 and f - skipped[(phase, si)] == saved, (phase, si, f, skipped[(phase, si)])


def test_cfg_skip_composes_with_code():
    """With CoDe the skipped scales may be the refiner's only, or reach into its prefill and the drafter's scales."""
    vae = _vae()
    drafter, refiner = _var(vae, depth=3, seed=2), _var(vae, depth=2, seed=3)
    sampler = CoDeSampler(drafter, refiner, draft_steps=3)
    SN = len(PATCH_NUMS)
    plain = sampler.sample(3, LABELS, **KW)
    for K in (1, 2, 3, 4):  # 2: the refiner's prefill scale is skipped; 3 and 4: drafter scales too
        skipped = sampler.sample(3, LABELS, cfg_skip=K, **KW)
        assert [t.shape for t in skipped] == [t.shape for t in plain]
        assert all(torch.equal(a, b) for a, b in zip(skipped[:SN - K], plain[:SN - K]))
        assert _agree(skipped[SN - K:], plain[SN - K:]) < 0.9


@pytest.mark.parametrize("bad", [-1, len(PATCH_NUMS), 1.0, True, "2"])
def test_cfg_skip_rejects_bad_values(var, bad):
    with pytest.raises(ValueError, match=r"cfg_skip must be an int in \[0, 4\]"):
        VARSampler(var).sample(2, 1, cfg_skip=bad, output="tokens")
