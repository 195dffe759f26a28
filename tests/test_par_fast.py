"""PARSampler's fast mode (varcore.sampling.par_fast) against the parity mode and teacher forcing: packed
projections, every step's logits (raster, PAR-4x, PAR-16x; CFG mixed before the head; grouped-query attention),
the sampled tokens under every sampling setting, and bad arguments."""
import pytest
import torch
import torch.nn.functional as F

import varcore.sampling.par_fast as par_fast
from varcore import _ext
from test_gpt import one_thread, tiny  # noqa: F401  (one_thread is an autouse fixture)
from varcore.sampling.par import PARSampler
from varcore.sampling.par_fast import FastDecoder, PackedLinear


@pytest.mark.parametrize("backend", ["kernel", "onednn", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_linear_matches_f_linear(backend, dtype, monkeypatch):
    kernel = _ext.use_kernel("decode_linear", torch.device("cpu"))
    if backend == "kernel" and not kernel or backend == "onednn" and not par_fast.onednn_linear_available():
        pytest.skip(f"{backend} is not available in this build")
    if backend != "kernel":
        monkeypatch.setattr(_ext, "use_kernel", lambda op, device: False)
    if backend == "dense":
        monkeypatch.setattr(par_fast, "onednn_linear_available", lambda: False)
    torch.manual_seed(0)
    for out_f, in_f in [(96, 64), (130, 48), (2048, 768)]:
        w = torch.randn(out_f, in_f, dtype=dtype)
        lin = PackedLinear(w)
        assert lin.backend == (backend if dtype == torch.float32 else "dense")
        for rows in (1, 2, 3, 8, 17, 32):
            x = torch.randn(rows, in_f, dtype=dtype)
            torch.testing.assert_close(lin(x), F.linear(x, w), atol=1e-4 * in_f ** 0.5, rtol=1e-5)


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
    original = sampler.decoder.step
    monkeypatch.setattr(sampler.decoder, "step", lambda *a, **k: logits.append(original(*a, **k)) or logits[-1])
    seq = sampler.sample_tokens(labels, cfg_scale=cfg_scale, order="par", generator=torch.Generator().manual_seed(1))
    assert len(logits) == sampler.steps
    with torch.no_grad():
        ref = _teacher_logits(model, labels, seq, cfg_scale)
    torch.testing.assert_close(torch.cat(logits, dim=1), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("settings", [dict(cfg_scale=1.5), dict(cfg_scale=1.0, temperature=0.7),
                                      dict(cfg_scale=3.0, top_k=6, top_p=0.9, cfg_interval=5),
                                      dict(cfg_scale=2.0, sample_logits=False)])
def test_fast_mode_draws_the_parity_tokens(M, settings):
    """Same distribution and the same RNG stream: on these models no draw lands within rounding of a boundary,
    so the tokens are identical (a wrong CFG mix, RoPE row or cache position changes them)."""
    model = tiny(M=M, grid=8, seed=M)
    labels = torch.tensor([0, 2, 3, 1])
    for seed in range(3):
        parity = PARSampler(model).sample_tokens(labels, generator=torch.Generator().manual_seed(seed), **settings)
        fast = PARSampler(model, fast=True).sample_tokens(labels, generator=torch.Generator().manual_seed(seed),
                                                          **settings)
        assert torch.equal(fast, parity), (seed, (fast != parity).sum().item())


def test_fast_decoder_follows_weight_changes_and_frees_caches():
    """Weights changed in place or loaded after the sampler was built are repacked before the next call."""
    model, other = tiny(M=2, grid=8), tiny(M=2, grid=8, seed=5)
    sampler = PARSampler(model, fast=True)
    before = sampler.sample_tokens([1, 2], sample_logits=False)
    assert all(layer.k is None for layer in sampler.decoder.layers)
    assert sampler.decoder.is_current()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(-1.5)
    assert not sampler.decoder.is_current()
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
    with pytest.raises(TypeError, match="model must be"):
        FastDecoder(torch.nn.Linear(2, 2))
    decoder = FastDecoder(model)
    with pytest.raises(ValueError, match="max_seq"):
        decoder.setup(2, 10_000)
    decoder.setup(2, 64)
    h = torch.zeros(2, 4, 32)
    with pytest.raises(ValueError, match="rows"):
        decoder.step(torch.zeros(4, 4, 32), 4)
    with pytest.raises(ValueError, match="exceed"):
        decoder.step(h, 62)
    with pytest.raises(ValueError, match="different prefixes"):
        decoder.step(h, 2)  # positions 2..5 straddle the single-token steps and the first group
