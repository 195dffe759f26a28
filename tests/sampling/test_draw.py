"""The one top-k/top-p filter against plain per-row references of the two official conventions, and the
inverse-CDF search against a one-level inversion."""
import numpy as np
import pytest
import torch

from varcore.sampling import draw
from varcore.sampling.draw import inverse_cdf_index, top_k_top_p_filter_, top_k_top_p_filtering


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _var_ref(row, top_k, top_p):
    """VAR/CoDe: keep >= k-th largest; then drop ascending positions whose cumulative mass is <= 1 - top_p."""
    row = row.copy()
    if 0 < top_k < row.size:
        row[row < np.sort(row)[-top_k]] = -np.inf
    if top_p > 0:
        order = np.argsort(row, kind="stable")
        cum = np.cumsum(_softmax(row[order]))
        remove = cum <= 1 - top_p
        remove[-1] = False
        row[order[remove]] = -np.inf
    return row


def _llamagen_ref(row, top_k, top_p):
    """LlamaGen: keep >= k-th largest; keep the descending prefix up to the first position whose mass passes top_p."""
    row = row.copy()
    if top_k > 0:
        row[row < np.sort(row)[-min(top_k, row.size)]] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(_softmax(row[order]))
        crossed = np.nonzero(cum > top_p)[0]
        if crossed.size:
            row[order[crossed[0] + 1:]] = -np.inf
    return row


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.7), (8, 0.9), (3, 0.3), (40, 0.95)])
def test_var_convention(seed, top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    ours = top_k_top_p_filter_(logits.clone(), top_k, top_p)
    ref = np.stack([_var_ref(r, top_k, top_p) for r in logits.numpy()])
    assert np.array_equal(np.isinf(ours.numpy()), np.isinf(ref))
    assert torch.equal(ours[ours.isfinite()], logits[ours.isfinite()])  # kept logits are untouched


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.9), (3, 0.3), (100, 0.5)])
def test_llamagen_convention(seed, top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    ours = top_k_top_p_filtering(logits.clone(), top_k=top_k, top_p=top_p)
    ref = np.stack([_llamagen_ref(r, top_k, top_p) for r in logits.numpy()])
    assert np.array_equal(np.isinf(ours.numpy()), np.isinf(ref))


def test_conventions_differ_only_in_top_p_and_disabling():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3)) * 2
    assert torch.equal(top_k_top_p_filter_(logits.clone(), 7, 0.0),
                       top_k_top_p_filter_(logits.clone(), 7, 1.0, convention="llamagen"))
    with pytest.raises(ValueError, match="convention"):
        top_k_top_p_filter_(logits.clone(), convention="hf")
    with pytest.raises(ValueError, match="top_k"):
        top_k_top_p_filtering(logits.clone(), top_k=-1)


@pytest.mark.parametrize("w", [0.0, 1.0, 1.5, 4.0])
def test_guidance_of_both_conventions(w):
    """VAR's (1 + t) cond - t uncond and LlamaGen's uncond + (cond - uncond) * s, each bit for bit in its official
    op order (float32 rounding depends on it), and the two agree as functions with t = s - 1."""
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    var = draw.guide_var(cond, uncond.clone(), w)
    assert torch.equal(var, cond * (1 + w) - uncond * w)
    lg = draw.guide_llamagen(cond, uncond, w)
    assert torch.equal(lg, uncond + (cond - uncond) * w)
    torch.testing.assert_close(draw.guide_var(cond, uncond.clone(), w - 1), lg, atol=1e-5, rtol=1e-5)
    if w:
        assert not torch.equal(var, cond)


@pytest.mark.parametrize("V", [1, 3, 7, 64, 100, 512, 1000, 16384])
def test_inverse_cdf_index_is_the_one_level_inversion(V):
    """The two-level search (block sums, then inside the chosen block) picks the code of a one-level float64
    inversion, with V a multiple of the block or not, most weights zero, and uniforms landing exactly on a
    cumulative weight (the draw is then the next code of positive weight): always a code of positive weight."""
    g = torch.Generator().manual_seed(V)
    w = torch.rand(1500, V, generator=g)
    w[torch.rand(1500, V, generator=g) < 0.7] = 0
    w[:, -1] += (w.sum(-1) == 0).float()
    u = torch.rand(1500, 1, dtype=torch.float64, generator=g)
    w[0], u[0] = 0, 0.5  # two equal weights: u * total is exactly the first one's cumulative weight
    w[0, 0] = w[0, -1] = 1
    got = inverse_cdf_index(w, u)[:, 0]
    cdf = w.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    assert torch.equal(got, expected)
    assert got[0] == V - 1 and bool((w.gather(1, got[:, None]) > 0).all())
    assert torch.equal(inverse_cdf_index(w.t().contiguous().t(), u)[:, 0], got)  # a strided view of the weights
    flag = torch.zeros((), dtype=torch.bool)
    inverse_cdf_index(w, u, flag)
    assert not flag
    w[5, 0] = float("nan")
    inverse_cdf_index(w, u, flag)
    assert flag
