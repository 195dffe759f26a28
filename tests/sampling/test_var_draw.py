"""The inverse-CDF draw of the VAR and CoDe samplers (``draw="inverse_cdf"``): each token against a float64
reference inversion of its own filtered distribution at its own uniform, the tokens of every scale against the
distributions they were drawn from (chi-square), the random numbers it takes from the generator, its composition
with the other accelerators and CoDe, and bad values."""
import copy

import numpy as np
import pytest
import torch

from stats import chi_square_p
from tiny_var import tiny_var, tiny_vae
from varcore.sampling.code import CoDeSampler
from varcore.sampling.draw import top_k_top_p_filter_
from varcore.sampling.var import VARSampler

PATCH_NUMS = (1, 2, 3, 4)
ALPHA = 1e-3  # fixed seeds: each verdict is fixed


@pytest.fixture(scope="module")
def var():
    return tiny_var(tiny_vae(PATCH_NUMS)).eval()


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _record(sampler):
    """Wrap the sampler's logits and random numbers: every scale's (guided logits (B*l, V), noise)."""
    logits, noise = [], []
    real_logits, real_noise = sampler._guided_logits, sampler.noise

    def guided_logits(*args, **kw):
        out = real_logits(*args, **kw)
        logits.append(out.reshape(-1, out.shape[-1]).clone())
        return out

    def scale_noise(*args, **kw):
        out = real_noise(*args, **kw)
        noise.append(out[0].clone())
        return out

    sampler._guided_logits, sampler.noise = guided_logits, scale_noise
    return logits, noise


def _reference_probs(logits_NV, top_k, top_p, temperature):
    """float64 probabilities of the official filters (top-k, then top-p) and the temperature."""
    filtered = top_k_top_p_filter_(logits_NV.clone(), top_k, top_p)
    z = filtered.double().numpy() / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=9, temperature=0.7), dict(top_p=0.8, cfg=3.0),
                                dict(cfg_skip=2, prune={3: 0.5}), dict(kv_budget={2: 0.5}, top_k=20),
                                dict(seeds=[5, 6, 7]), dict(more_smooth=True)])
def test_each_token_inverts_its_distribution_at_its_uniform(var, kw):
    """Every token is the first code whose cumulative probability exceeds its uniform, recomputed in float64
    from the scale's logits (the filters, the temperature and the per-image generators of ``kw``); one uniform
    per token is all the draw takes."""
    sampler = VARSampler(var)
    logits, noise = _record(sampler)
    call = {"g_seed": None if "seeds" in kw else 4, "cfg": 1.5, "output": "tokens", **kw}
    tokens = sampler.sample(3, torch.tensor([1, 5, 8]), draw="inverse_cdf", **call)
    top_k, top_p, temperature = kw.get("top_k", 0), kw.get("top_p", 0.0), kw.get("temperature", 1.0)
    for si, (idx_Bl, logits_NV, u_N1) in enumerate(zip(tokens, logits, noise)):
        assert u_N1.shape == (idx_Bl.numel(), 1) and u_N1.dtype == torch.float64
        cdf = np.cumsum(_reference_probs(logits_NV, top_k, top_p, temperature), axis=-1)
        expected = [np.searchsorted(row, u * row[-1], side="right") for row, u in zip(cdf, u_N1[:, 0].numpy())]
        assert idx_Bl.reshape(-1).tolist() == expected, f"scale {si}"
    assert not _same(tokens, sampler.sample(3, torch.tensor([1, 5, 8]), **call))  # the official draw: others


def test_the_tokens_follow_their_distributions(var):
    """Pearson's chi-square, per scale, of the drawn codes against the summed distributions of the rows they were
    drawn from (each row's own conditional distribution, CFG and top-k applied): a draw of the wrong code, or
    from the unfiltered logits, fails it. The official draw passes the same test."""
    for draw in ("inverse_cdf", "multinomial"):
        sampler = VARSampler(var)
        logits, _ = _record(sampler)
        tokens = sampler.sample(600, torch.arange(600) % 10, g_seed=11, cfg=2.0, top_k=24, draw=draw,
                                output="tokens")
        for si, (idx_Bl, logits_NV) in enumerate(zip(tokens, logits)):
            probs = torch.from_numpy(_reference_probs(logits_NV, 24, 0.0, 1.0)).mean(dim=0)
            counts = torch.bincount(idx_Bl.reshape(-1), minlength=probs.numel())
            assert chi_square_p(counts, probs) > ALPHA, (draw, si)
            shifted = torch.roll(probs, 1)  # the neighbouring code's probability: must be refused
            assert chi_square_p(counts, shifted) < ALPHA, (draw, si)


def test_it_takes_one_uniform_per_token_from_the_generator(var):
    """With a generator the call advances it by the float64 uniforms of each scale's B * pn^2 tokens, in scale
    order, and nothing else (labels given, no more_smooth)."""
    B = 2
    gen = torch.Generator().manual_seed(9)
    VARSampler(var).sample(B, torch.tensor([3, 4]), generator=gen, draw="inverse_cdf", output="tokens")
    replay = torch.Generator().manual_seed(9)
    for pn in PATCH_NUMS:
        torch.rand((B * pn * pn, 1), dtype=torch.float64, generator=replay)
    assert torch.equal(gen.get_state(), replay.get_state())


def _uniforms(gen, B, patch_nums):
    return [torch.rand((B * pn * pn, 1), dtype=torch.float64, generator=gen) for pn in patch_nums]


@pytest.mark.parametrize("seeded", [True, False])
def test_code_draws_both_stages_by_inverse_cdf(var, seeded):
    """CoDe's drafter draws the tokens of the drafter alone; the refiner's uniforms come where the official
    refiner's stream would put them: seeded, after the drafted scales' (the drafter's generator goes on); from the
    global RNG, after the drafter's and the replay of the drafted scales' (``rng_parity``)."""
    vae = var.vae_proxy[0]
    drafter, refiner = tiny_var(vae, depth=3, seed=2).eval(), tiny_var(vae, seed=3).eval()
    B, N, labels = 2, 2, torch.tensor([2, 6])
    code = CoDeSampler(drafter, refiner, draft_steps=N)
    _, noise = _record(code.refiner_stage)
    torch.manual_seed(1)
    tokens = code.sample(B, labels, g_seed=1 if seeded else None, draw="inverse_cdf", output="tokens")
    torch.manual_seed(1)
    alone = VARSampler(drafter).sample(B, labels, g_seed=1 if seeded else None, draw="inverse_cdf",
                                       output="tokens")
    assert _same(tokens[:N], alone[:N])
    gen = torch.Generator().manual_seed(1)
    expected = _uniforms(gen, B, PATCH_NUMS[:N]) if seeded else []
    if not seeded:  # the drafter's, then the replayed ones, from the global stream
        _uniforms(gen, B, PATCH_NUMS[:N])
        expected = _uniforms(gen, B, PATCH_NUMS[:N])
    expected += _uniforms(gen, B, PATCH_NUMS[N:])
    refined = noise if not seeded else expected[:N] + noise
    assert len(refined) == len(PATCH_NUMS)
    assert _same(refined, expected)
    torch.manual_seed(1)
    assert not _same(tokens[N:], code.sample(B, labels, g_seed=1 if seeded else None, output="tokens")[N:])


@pytest.mark.parametrize("bad", ["gumbel", None, 1, "Inverse_CDF"])
def test_bad_draw_is_refused(var, bad):
    with pytest.raises(ValueError, match="draw must be one of"):
        VARSampler(var).sample(1, 0, g_seed=0, draw=bad)
    vae = var.vae_proxy[0]
    with pytest.raises(ValueError, match="draw must be one of"):
        CoDeSampler(tiny_var(vae, seed=2).eval(), tiny_var(vae, seed=3).eval(), draft_steps=2).sample(
            1, 0, g_seed=0, draw=bad)


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_inverse_cdf_draw_on_cuda(var, cuda_graphs):
    """On a GPU (with and without CUDA graphs for the forward passes) every token is still the float64 inversion
    of its own distribution at its uniform."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sampler = VARSampler(copy.deepcopy(var).cuda(), copy.deepcopy(var.vae_proxy[0]).cuda(), cuda_graphs=cuda_graphs)
    logits, noise = _record(sampler)
    for _ in range(2):  # the second call replays the captured graphs
        logits.clear()
        noise.clear()
        tokens = sampler.sample(4, torch.tensor([0, 2, 4, 6], device="cuda"), g_seed=3, cfg=2.0, top_k=12,
                                draw="inverse_cdf", output="tokens")
        for si, (idx_Bl, logits_NV, u_N1) in enumerate(zip(tokens, logits, noise)):
            cdf = np.cumsum(_reference_probs(logits_NV.cpu(), 12, 0.0, 1.0), axis=-1)
            u = u_N1[:, 0].cpu().numpy()
            expected = [np.searchsorted(row, x * row[-1], side="right") for row, x in zip(cdf, u)]
            assert idx_Bl.reshape(-1).tolist() == expected, f"scale {si}"
