"""PARSampler's fast mode (the model's decode layout, Transformer.pack_for_decoding) against the parity mode and
teacher forcing: packed projections, every step's logits (raster, PAR-4x, PAR-16x; CFG mixed before the head; grouped-query attention),
the sampled tokens under every sampling setting, the inverse-CDF draw, and bad arguments."""
import pytest
import torch
import torch.nn.functional as F

import varcore.models.gpt as gpt
from varcore.ops import extension
from tiny_gpt import one_thread, tiny  # noqa: F401  (one_thread is an autouse fixture)
import varcore.sampling.draw as draw
from varcore.sampling.draw import inverse_cdf_sample
from varcore.sampling.par import PARSampler
from varcore.models.gpt import PackedLinear


@pytest.mark.parametrize("backend", ["kernel", "onednn", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_linear_matches_f_linear(backend, dtype, monkeypatch):
    kernel = extension.use_kernel("decode_linear", torch.device("cpu"))
    if backend == "kernel" and not kernel or backend == "onednn" and not gpt.onednn_linear_available():
        pytest.skip(f"{backend} is not available in this build")
    if backend != "kernel":
        monkeypatch.setattr(extension, "use_kernel", lambda op, device: False)
    if backend == "dense":
        monkeypatch.setattr(gpt, "onednn_linear_available", lambda: False)
    torch.manual_seed(0)
    for out_f, in_f in [(96, 64), (130, 48), (2048, 768)]:
        w = torch.randn(out_f, in_f, dtype=dtype)
        lin = PackedLinear(w)
        assert lin.backend == (backend if dtype == torch.float32 else "dense")
        g = torch.rand(in_f, dtype=dtype) + 0.5
        for rows in (1, 2, 3, 8, 17, 32):
            x = torch.randn(rows, in_f, dtype=dtype)
            torch.testing.assert_close(lin(x), F.linear(x, w), atol=1e-4 * in_f ** 0.5, rtol=1e-5)
            torch.testing.assert_close(lin.normed(x, g, 1e-5), F.linear(F.rms_norm(x, (in_f,), g, 1e-5), w),
                                       atol=1e-4 * in_f ** 0.5, rtol=1e-5)


def _teacher_logits(model, labels, seq_par, cfg_scale):
    """Teacher-forced logits of the PAR-order tokens, CFG-mixed as the official sampler mixes logits."""
    cond, _ = model(idx=seq_par[:, :-1], cond_idx=labels)
    if cfg_scale <= 1.0:
        return cond
    uncond, _ = model(idx=seq_par[:, :-1], cond_idx=torch.full_like(labels, model.num_classes))
    return uncond + (cond - uncond) * cfg_scale


@pytest.mark.parametrize("M,grid,kw", [(1, 4, {}), (2, 8, {}), (4, 8, {}), (2, 8, dict(n_kv_head=1)),
                                       (4, 8, dict(n_head=4, n_kv_head=2))])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_fast_steps_match_teacher_forcing(M, grid, kw, cfg_scale, monkeypatch):
    """Every fast step's logits (prefill, single-token, transition and group steps; CFG on the normed hidden
    states) equal the teacher-forced, logit-mixed ones of the tokens the sampler drew."""
    model = tiny(M=M, grid=grid, dim=32, **{"n_head": 2, **kw})
    labels = torch.tensor([1, 3, 0])
    sampler = PARSampler(model, fast=True)
    logits = []
    original = sampler.step_logits
    monkeypatch.setattr(sampler, "step_logits", lambda *a, **k: logits.append(original(*a, **k)) or logits[-1])
    seq = sampler.sample_tokens(labels, cfg_scale=cfg_scale, order="par", generator=torch.Generator().manual_seed(1))
    assert len(logits) == sampler.steps
    with torch.no_grad():
        ref = _teacher_logits(model, labels, seq, cfg_scale)
    torch.testing.assert_close(torch.cat(logits, dim=1), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("M,cfg_scale,top_k", [(1, 1.0, 0), (2, 2.5, 0), (4, 1.5, 5)])
def test_fast_mode_draws_by_inverse_cdf(M, cfg_scale, top_k, monkeypatch):
    """The fast mode's default draw: replaying inverse_cdf_sample over the logits of every step, with a generator
    seeded alike, gives exactly the tokens the sampler drew (one uniform per row, in step order)."""
    model = tiny(M=M, grid=8, seed=M)
    labels = torch.tensor([1, 3, 0])
    sampler = PARSampler(model, fast=True)
    assert sampler.draw == "inverse_cdf"
    logits = []
    original = sampler.step_logits
    monkeypatch.setattr(sampler, "step_logits", lambda *a, **k: logits.append(original(*a, **k)) or logits[-1])
    seq = sampler.sample_tokens(labels, cfg_scale=cfg_scale, top_k=top_k, order="par",
                                generator=torch.Generator().manual_seed(7))
    gen, replay = torch.Generator().manual_seed(7), []
    for step_logits in logits:
        B, n, V = step_logits.shape
        flat = step_logits.reshape(B * n, V).clone()
        if top_k:
            flat.masked_fill_(flat < flat.topk(top_k)[0][:, -1:], -float("inf"))
        replay.append(inverse_cdf_sample(F.softmax(flat, dim=-1), generator=gen).view(B, n))
    assert torch.equal(torch.cat(replay, dim=1), seq)


def test_inverse_cdf_sample_distribution():
    """Frequencies over 200k draws match the weights (chi-square), zero-weight entries (first, inner, last) are
    never drawn, and a fixed generator seed repeats the draws."""
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.5, 0.0, 2.5, 0.0])
    draws = inverse_cdf_sample(weights.expand(200_000, -1), generator=torch.Generator().manual_seed(0))
    assert draws.shape == (200_000, 1) and draws.dtype == torch.int64
    counts = torch.bincount(draws.flatten(), minlength=8).double()
    assert counts[weights == 0].sum() == 0
    expected = weights.double() / weights.sum() * draws.numel()
    nz = weights > 0
    chi2 = ((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum().item()
    assert chi2 < 16.3, chi2  # 3 degrees of freedom: p = 0.001
    again = inverse_cdf_sample(weights.expand(200_000, -1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    peaked = torch.zeros(3, 16384)
    peaked[0, 0], peaked[1, 9000], peaked[2, 16383] = 1.0, 1e-30, 5.0
    assert inverse_cdf_sample(peaked).flatten().tolist() == [0, 9000, 16383]


@pytest.mark.parametrize("u,expected", [(0.0, [0, 3, 2]), (1.0, [1, 3, 3])])
def test_inverse_cdf_sample_edges_land_on_weight(u, expected, monkeypatch):
    """The extreme uniforms: 0 skips leading zero weights; 1 (a product that rounds up to the row's total) lands
    on the last entry with weight, not past it."""
    monkeypatch.setattr(draw.torch, "rand", lambda shape, **kw: torch.full(shape, u, dtype=torch.float64))
    weights = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 1.0, 2.0]])
    assert inverse_cdf_sample(weights).flatten().tolist() == expected


@pytest.mark.parametrize("bad", [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, float("nan")]]),
                                 torch.tensor([[1.0, -0.5]]), torch.tensor([[1.0, float("inf")]]),
                                 torch.ones(2, 0), torch.ones(4)])
def test_inverse_cdf_sample_bad_weights(bad):
    with pytest.raises(ValueError, match="weights_NV"):
        inverse_cdf_sample(bad)


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("settings", [dict(cfg_scale=1.5), dict(cfg_scale=1.0, temperature=0.7),
                                      dict(cfg_scale=3.0, top_k=6, top_p=0.9, cfg_interval=5),
                                      dict(cfg_scale=2.0, sample_logits=False)])
def test_fast_mode_draws_the_parity_tokens(M, settings):
    """With the official draw, same distribution and the same RNG stream: on these models no draw lands within
    rounding of a boundary, so the tokens are identical (a wrong CFG mix, RoPE row or cache position changes them)."""
    model = tiny(M=M, grid=8, seed=M)
    labels = torch.tensor([0, 2, 3, 1])
    for seed in range(3):
        parity = PARSampler(model).sample_tokens(labels, generator=torch.Generator().manual_seed(seed), **settings)
        fast = PARSampler(model, fast=True, draw="multinomial").sample_tokens(
            labels, generator=torch.Generator().manual_seed(seed), **settings)
        assert torch.equal(fast, parity), (seed, (fast != parity).sum().item())


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("order", ["raster", "par"])
def test_a_call_can_pick_its_draw(fast, order):
    """``draw=`` of one call overrides the sampler's own for that call only: the tokens of a sampler built with
    that draw, and the sampler's own draw again on the next call."""
    model, labels = tiny(M=2, grid=8, seed=3), torch.tensor([1, 3, 2])
    sampler = PARSampler(model, fast=fast)
    own = "inverse_cdf" if fast else "multinomial"
    other = "multinomial" if fast else "inverse_cdf"

    def tokens(s, **kw):
        return s.sample_tokens(labels, cfg_scale=2.0, top_k=7, order=order,
                               generator=torch.Generator().manual_seed(6), **kw)

    picked = tokens(sampler, draw=other)
    assert torch.equal(picked, tokens(PARSampler(model, fast=fast, draw=other)))
    assert not torch.equal(picked, tokens(sampler))
    assert sampler.draw == own and torch.equal(tokens(sampler), tokens(sampler, draw=own))
    with pytest.raises(ValueError, match="draw must be one of"):
        tokens(sampler, draw="gumbel")


def test_fast_decoder_follows_weight_changes_and_frees_caches():
    """Weights changed in place or loaded after the sampler was built are repacked before the next call."""
    model, other = tiny(M=2, grid=8), tiny(M=2, grid=8, seed=5)
    sampler = PARSampler(model, fast=True)
    before = sampler.sample_tokens([1, 2], sample_logits=False)
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    assert sampler.packed.is_current(model)
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(-1.5)
    assert not sampler.packed.is_current(model)
    changed = sampler.sample_tokens([1, 2], sample_logits=False)
    assert torch.equal(changed, PARSampler(model).sample_tokens([1, 2], sample_logits=False))
    assert not torch.equal(changed, before)
    model.load_state_dict(other.state_dict())
    loaded = sampler.sample_tokens([1, 2], sample_logits=False)
    assert torch.equal(loaded, PARSampler(other).sample_tokens([1, 2], sample_logits=False))


def test_fast_mode_bad_arguments():
    model = tiny(M=2, grid=8)
    with pytest.raises(TypeError, match="fast must be a bool"):
        PARSampler(model, fast=1)
    with pytest.raises(ValueError, match="draw must be one of"):
        PARSampler(model, fast=True, draw="gumbel")
    model.setup_caches(2, 64, torch.float32)
    packed = model.pack_for_decoding()
    h = torch.zeros(2, 4, 32)
    with pytest.raises(ValueError, match="batch"):
        model.hidden_cached(torch.zeros(4, 4, 32), 4, packed)
    with pytest.raises(ValueError, match="exceed"):
        model.hidden_cached(h, 62, packed)
    model.clear_caches()
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.hidden_cached(h, 0, packed)


@pytest.mark.parametrize("M", [2, 4])
def test_packed_layout_masks_steps_across_groups(M):
    """A multi-position call whose positions see different prefixes (the single-token steps and a group) is masked
    in the decode layout as in the model's modules: both give the teacher-forced hidden states."""
    model = tiny(M=M, grid=8, seed=3).eval()
    n = M * M
    seq = torch.randint(0, model.vocab_size, (2, 3 * n))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        h = model.teacher_forcing_embeddings(seq, labels)
        for packed in (None, model.pack_for_decoding()):
            model.setup_caches(2, h.shape[1], torch.float32)
            logits = model.logits(model.hidden_cached(h, 0, packed), packed)  # one call over every position
            ref = model.forward_teacher(seq, labels)
            k = ref.shape[1]
            torch.testing.assert_close(logits[:, :k], ref, atol=2e-5, rtol=2e-5)
            model.clear_caches()
