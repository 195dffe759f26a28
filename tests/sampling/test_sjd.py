"""Speculative Jacobi decoding in PARSampler (``sjd=W``): the draws against the model's exact joint distribution
(chi-square, enumerated over every sequence of a tiny GPT), a wrong acceptance rule failing that test, the
forward-pass count, window 1 and greedy decoding against plain decoding, and bad values."""
import itertools

import pytest
import torch

from stats import chi_square_p
from tiny_gpt import one_thread, tiny  # noqa: F401  (one_thread is an autouse fixture)
import varcore.sampling.sjd as jacobi
from varcore.sampling.draw import probs_llamagen
from varcore.sampling.par import PARSampler

ALPHA = 1e-3  # the fixed significance level of the distribution tests (seeds fixed, so each verdict is fixed)


def exact_joint(model, label, N, cfg_scale=1.0, temperature=1.0, top_k=0):
    """P(t_0 .. t_{N-1}) of every sequence of N tokens in PAR order, index sum(t_i * V**(N-1-i)): the product
    of the sampler's per-step distributions, from teacher forcing on every prefix (a step's tokens are drawn
    independently given the prefix, so the product holds for PAR groups too)."""
    V = model.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    labels = torch.full((len(seqs),), label)
    with torch.no_grad():
        logits, _ = model(idx=seqs[:, :-1], cond_idx=labels)
        if cfg_scale > 1.0:
            uncond, _ = model(idx=seqs[:, :-1], cond_idx=torch.full_like(labels, model.num_classes))
            logits = uncond + (logits - uncond) * cfg_scale
    p = probs_llamagen(logits, temperature, top_k).view(len(seqs), N, V).double()
    return p.gather(-1, seqs[..., None])[..., 0].prod(dim=-1)


def index_of(seq, V):
    return seq @ (V ** torch.arange(seq.shape[1] - 1, -1, -1))


def sjd_counts(sampler, label, B, calls, N, W, seed, **kw):
    V = sampler.model.vocab_size
    gen, counts = torch.Generator().manual_seed(seed), torch.zeros(V ** N, dtype=torch.long)
    for _ in range(calls):
        seq = sampler.sample_tokens([label] * B, generator=gen, order="par", num_tokens=N, sjd=W, **kw)
        counts += torch.bincount(index_of(seq, V), minlength=V ** N)
    return counts


# raster (M=1, 4 tokens, 4 codes: 256 sequences) and PAR-4x (M=2: 3 single-token steps, then the transition
# step and one more group of 4; 2 codes: 4096 sequences), with and without CFG, batch 1 and batches where rows
# accept different counts (the min rule decides). "calls" is the default run's; the slow run makes 5x as many.
CASES = {
    "raster-B1": dict(M=1, grid=2, vocab=4, N=4, B=1, calls=500, W=4, kw=dict(cfg_scale=1.0), fast=True),
    "raster-B1-cfg": dict(M=1, grid=2, vocab=4, N=4, B=1, calls=500, W=3, kw=dict(cfg_scale=3.0), fast=False),
    "raster-B8": dict(M=1, grid=2, vocab=4, N=4, B=8, calls=400, W=4, kw=dict(cfg_scale=1.0, temperature=0.7),
                      fast=True),
    "raster-B8-cfg-topk": dict(M=1, grid=2, vocab=4, N=4, B=8, calls=400, W=4, kw=dict(cfg_scale=3.0, top_k=3),
                               fast=True),
    "par-B16-cfg": dict(M=2, grid=4, vocab=2, N=12, B=16, calls=120, W=3, kw=dict(cfg_scale=2.0), fast=True),
}


def case(name):
    c = CASES[name]
    model = tiny(M=c["M"], grid=c["grid"], dim=16, n_head=2, vocab=c["vocab"], classes=2, seed=3)
    return c, model, PARSampler(model, fast=c["fast"])


def check_joint(name, scale=1, seed=11):
    c, model, sampler = case(name)
    counts = sjd_counts(sampler, 1, c["B"], c["calls"] * scale, c["N"], c["W"], seed=seed, **c["kw"])
    return chi_square_p(counts, exact_joint(model, 1, c["N"], **c["kw"]))


@pytest.mark.parametrize("name", list(CASES))
def test_sjd_draws_follow_the_exact_joint(name):
    assert check_joint(name) > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sjd_draws_follow_the_exact_joint_more_samples(name):
    assert check_joint(name, scale=5, seed=12) > ALPHA


def test_always_accepting_fails_the_test(monkeypatch):
    """The same test rejects a sampler that accepts every draft: it has power against a wrong acceptance rule."""
    monkeypatch.setattr(jacobi, "accept", lambda u, p_d, q_d: torch.ones_like(u, dtype=torch.bool))
    assert check_joint("raster-B8") < ALPHA
    assert check_joint("raster-B1") < ALPHA


def counting(sampler, monkeypatch):
    calls = []
    original = sampler.step_logits
    monkeypatch.setattr(sampler, "step_logits", lambda h, start, *a: calls.append((start, h.shape[1]))
                        or original(h, start, *a))
    return calls


@pytest.mark.parametrize("M,grid,num_tokens", [(1, 4, None), (2, 4, None), (2, 8, 12), (1, 4, 7)])
def test_forward_passes_of_plain_decoding(M, grid, num_tokens, monkeypatch):
    sampler = PARSampler(tiny(M=M, grid=grid))
    calls = counting(sampler, monkeypatch)
    sampler.sample_tokens([0, 1], order="par", num_tokens=num_tokens)
    n, N = M * M, num_tokens or grid * grid
    expected = min(N, n) + max(N - n, 0) // n
    assert sampler.forward_passes == len(calls) == expected
    if num_tokens is None:
        assert expected == sampler.steps


def context_blind(M, grid, seed=0):
    """A tiny GPT whose next-token distribution hardly depends on the tokens drawn so far (token embeddings
    scaled down): the re-drafted windows are accepted, as for the predictable regions of an image."""
    model = tiny(M=M, grid=grid, vocab=16, seed=seed)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.02)
    return model


@pytest.mark.parametrize("M,grid,W", [(1, 4, 4), (1, 4, 16), (2, 8, 3)])
@pytest.mark.parametrize("B", [1, 5])
def test_sjd_needs_fewer_passes_and_counts_them(M, grid, W, B, monkeypatch):
    """Every model call is counted; each window commits between 1 and W steps of its phase, and on a model that
    mostly ignores the context SJD needs fewer passes than the plain step count."""
    sampler = PARSampler(context_blind(M, grid), fast=True)
    calls = counting(sampler, monkeypatch)
    sampler.sample_tokens([b % 4 for b in range(B)], cfg_scale=2.0, generator=torch.Generator().manual_seed(0), sjd=W)
    n = M * M
    phases = [n - 1, grid * grid // n - 1] if n > 1 else [grid * grid - 1]  # steps of the two phases
    assert sampler.forward_passes == len(calls)
    assert 1 + sum(-(-S // W) for S in phases) <= len(calls) < sampler.steps
    # each window: whole steps of its phase (1 token before position n, n after), at most W of them, inside the
    # phase, and starting after the previous window's start (each commits at least one step)
    for (start, width), (before, _) in zip(calls[1:], calls):
        g = 1 if start < n else n
        assert width % g == 0 and width <= W * g and (start - (0 if g == 1 else n)) % g == 0
        assert start + width <= (n if start < n else grid * grid) and start > before


@pytest.mark.parametrize("M,grid", [(1, 4), (2, 8)])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("rng", ["generator", "seeds"])
def test_window_one_is_plain_decoding(M, grid, fast, rng):
    """sjd=1 feeds no drafts: each pass is the plain step at the same position and draws the same rows from the
    same generator(s), so the tokens and the pass count are plain decoding's (documented)."""
    sampler = PARSampler(tiny(M=M, grid=grid), fast=fast)
    kw = dict(cfg_scale=2.0, cfg_interval=5, top_k=8)

    def run(sjd):
        gen = dict(generator=torch.Generator().manual_seed(4)) if rng == "generator" else dict(seeds=[3, 9, 2 ** 40])
        return sampler.sample_tokens([0, 2, 1], sjd=sjd, **gen, **kw), sampler.forward_passes

    plain, passes = run(None)
    assert passes == sampler.steps
    for sjd in (0, 1):
        tokens, passes_sjd = run(sjd)
        assert torch.equal(tokens, plain) and passes_sjd == passes


@pytest.mark.parametrize("M,grid,W", [(1, 4, 5), (2, 8, 4), (1, 8, 6)])
@pytest.mark.parametrize("cfg_interval", [-1, 6])
@pytest.mark.parametrize("labels", [[0, 3], [0, 3, 1, 2, 2, 1, 3]])
def test_greedy_sjd_is_greedy_decoding(M, grid, W, cfg_interval, labels):
    """With sample_logits=False the model's distribution is one-hot: a draft passes exactly when it is the argmax
    and the redraw is the argmax, so SJD (greedy Jacobi decoding) gives plain greedy tokens; cfg_interval makes a
    window straddle the guided and unguided steps. With several images each one commits its own count, so the
    rows of a window sit at different offsets: their committed tokens must be the context of their drafts."""
    sampler = PARSampler(tiny(M=M, grid=grid, seed=1))
    kw = dict(cfg_scale=2.0, cfg_interval=cfg_interval, sample_logits=False)
    plain = sampler.sample_tokens(labels, **kw)
    assert torch.equal(sampler.sample_tokens(labels, sjd=W, **kw), plain)


def test_verify_counts_leading_passed_steps():
    drafts = torch.zeros(3, 4, 2, dtype=torch.long)
    p_d = torch.tensor([0.5, 0.5]).expand(3, 4, 2)
    q_d = torch.ones(3, 4, 2)
    u = torch.full((3, 4, 2), 0.1, dtype=torch.float64)
    u[0, 2, 1] = 0.7   # row 0 fails step 2 (one token of the group)
    u[1, 0, 0] = 0.5   # u == p/q fails (the test is u < p/q)
    u[2, 3, :] = 0.9   # row 2 fails only the last step
    ok, accepted = jacobi.verify(drafts, p_d, q_d, u)
    assert accepted.tolist() == [2, 0, 3]
    assert ok[0, 2].tolist() == [True, False] and not ok[1, 0, 0]
    committed = torch.zeros(3, 4, dtype=torch.bool)
    committed[1, :2] = True  # row 1 has committed steps 0 and 1: its failed test at step 0 does not count
    committed[0, :1] = True
    ok, accepted = jacobi.verify(drafts, p_d, q_d, u, committed)
    assert accepted.tolist() == [2, 4, 3] and bool(ok[1, 0].all())


def test_residual():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(jacobi.residual(p, q), torch.tensor([[0.5, 0.0, 0.2], [0.2, 0.3, 0.5]]))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4", 17])
def test_bad_window(bad):
    sampler = PARSampler(tiny(M=1, grid=4))
    with pytest.raises(ValueError, match="sjd"):
        sampler.sample_tokens([0], sjd=bad)


def test_sjd_needs_the_model_layout():
    sampler = PARSampler(tiny(M=2, grid=4))
    with pytest.raises(ValueError, match="sjd"):
        sampler.sample_tokens([0], order="par", steps=(1, 4), num_tokens=13, sjd=2)


@pytest.mark.parametrize("fast,draw,sample_logits", [(False, None, True), (True, None, True),
                                                     (True, "multinomial", True), (False, None, False)])
def test_sjd_refuses_nonfinite_logits(fast, draw, sample_logits):
    model = tiny(M=1, grid=4)
    with torch.no_grad():
        model.output.weight[5, 0] = float("nan")
    with pytest.raises(ValueError, match="GPT sampler are not finite"):
        PARSampler(model, fast=fast, draw=draw).sample_tokens([0, 1], cfg_scale=2.0, sample_logits=sample_logits,
                                                              sjd=4)
