"""Non-finite numbers never turn into tokens: every sampler refuses NaN/inf logits with one clear error, a tiny
temperature takes its limit (the greedy draw), and non-finite images are refused."""
import math

import pytest
import torch

from varcore.digits import load_bundled
from varcore.sampling.code import CoDeSampler
from varcore.sampling.draw import nonfinite_rows, temper
from varcore.sampling.par import PARSampler
from varcore.sampling.var import VARSampler

LABELS = torch.tensor([1, 7])


# ---------------------------------------------------------------------------------------------- the helpers
def test_temper_is_the_plain_quotient_where_it_does_not_overflow():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g) * 10
    x[0, :10] = -math.inf
    for t in (0.3, 1e-3, 0.9, 1.0, 1.7):
        assert torch.equal(temper(x, t), x / t)


@pytest.mark.parametrize("t", [1e-38, 1e-40, 5e-45])
def test_temper_takes_the_greedy_limit_where_it_overflows(t):
    x = torch.tensor([[1.0, 3.0, -2.0, 3.0, -math.inf],      # two maxima: uniform over them
                      [-5.0, -7.0, -6.0, -math.inf, -9.0],   # all negative: /t is -inf everywhere
                      [0.5, 0.25, 0.0, 0.125, 0.0]])         # small values: no overflow at some t
    probs = temper(x, t).softmax(-1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs[0], torch.tensor([0, 0.5, 0, 0.5, 0]))
    torch.testing.assert_close(probs[1], torch.tensor([1.0, 0, 0, 0, 0]))
    torch.testing.assert_close(probs[2], torch.tensor([1.0, 0, 0, 0, 0]))


def test_nonfinite_rows():
    x = torch.zeros(5, 4)
    x[1, 2] = math.nan
    x[2, 0] = math.inf
    x[3] = -math.inf            # nothing left to draw
    x[4, :3] = -math.inf        # filtered codes only: fine
    assert nonfinite_rows(x).tolist() == [False, True, True, True, False]


# ---------------------------------------------------------------------------------------------- the samplers
@pytest.fixture(scope="module")
def var_bundle():
    return load_bundled("digits-var")


@pytest.fixture(scope="module")
def code_bundle():
    return load_bundled("digits-code")


@pytest.fixture(scope="module")
def gpt_bundle():
    return load_bundled("digits-par")


def _poisoned(module, name, index, value):
    """A context in which ``module``'s parameter ``name`` holds ``value`` at ``index``."""
    class Ctx:
        def __enter__(self):
            p = dict(module.named_parameters())[name]
            self.p, self.old = p, p.data[index].clone()
            p.data[index] = value

        def __exit__(self, *exc):
            self.p.data[index] = self.old
    return Ctx()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_var_samplers_refuse_nonfinite_logits(var_bundle, value):
    vae, var = var_bundle
    with _poisoned(var, "head.bias", 3, value):
        with pytest.raises(ValueError, match="not finite"):
            VARSampler(var, vae).sample(2, LABELS, g_seed=0, cfg=2.0, output="tokens")
        with pytest.raises(ValueError, match="autoregressive_infer_cfg are not finite"):
            var.autoregressive_infer_cfg(2, LABELS, g_seed=0, cfg=2.0)


def test_var_sampler_refuses_a_cfg_that_overflows(var_bundle):
    vae, var = var_bundle
    with pytest.raises(ValueError, match="cfg=1e\\+38"):
        VARSampler(var, vae).sample(2, LABELS, g_seed=0, cfg=1e38, output="tokens")
    VARSampler(var, vae).sample(2, LABELS, g_seed=0, cfg=1e3, output="tokens")  # large but finite: fine


@pytest.mark.parametrize("t", [1e-30, 1e-44])
def test_var_sampler_tiny_temperature_is_greedy(var_bundle, t):
    """temperature -> 0 is the greedy draw: the tokens of top_k=1 (the same noise is drawn either way)."""
    vae, var = var_bundle
    sampler = VARSampler(var, vae)
    cold = sampler.sample(2, LABELS, g_seed=3, cfg=2.0, temperature=t, output="tokens")
    greedy = sampler.sample(2, LABELS, g_seed=3, cfg=2.0, top_k=1, output="tokens")
    for a, b in zip(cold, greedy):
        assert torch.equal(a, b)
    assert len(torch.cat([a.flatten() for a in cold]).unique()) > 1  # not token 0 everywhere


@pytest.mark.parametrize("where", ["drafter", "refiner"])
def test_code_samplers_refuse_nonfinite_logits(code_bundle, where):
    vae, drafter, refiner, N = code_bundle
    model = drafter if where == "drafter" else refiner
    with _poisoned(model, "head.bias", 0, math.nan):
        with pytest.raises(ValueError, match=f"CoDe's {where}"):
            CoDeSampler(drafter, refiner, N, vae).sample(2, LABELS, g_seed=0, cfg=2.0, output="tokens")
        from varcore.models.code import collaborative_infer_cfg
        with pytest.raises(ValueError, match="not finite|NaN"):
            collaborative_infer_cfg(drafter, refiner, 2, LABELS, N, g_seed=0, cfg=2.0)


def test_code_tiny_temperature_is_greedy(code_bundle):
    vae, drafter, refiner, N = code_bundle
    s = CoDeSampler(drafter, refiner, N, vae)
    cold = s.sample(2, LABELS, g_seed=1, cfg=2.0, temperature=1e-42, output="tokens")
    greedy = s.sample(2, LABELS, g_seed=1, cfg=2.0, top_k=1, output="tokens")
    assert all(torch.equal(a, b) for a, b in zip(cold, greedy))


def test_nonfinite_codebook_or_decoder_gives_no_images(var_bundle):
    vae, var = var_bundle
    with _poisoned(vae, "quantize.embedding.weight", (slice(None), 0), math.inf):
        with pytest.raises(ValueError, match="NaN or inf"):  # the next scale's logits, or else the images
            VARSampler(var, vae).sample(2, LABELS, g_seed=0, cfg=2.0, top_k=1)
    with _poisoned(vae, "decoder.conv_out.bias", 0, math.nan):  # the tokens are fine, the decoder is not
        with pytest.raises(ValueError, match="images decoded by the VAR sampler hold NaN"):
            VARSampler(var, vae).sample(2, LABELS, g_seed=0, cfg=2.0)
        with pytest.raises(ValueError, match="images decoded by autoregressive_infer_cfg hold NaN"):
            var.autoregressive_infer_cfg(2, LABELS, g_seed=0, cfg=2.0)


@pytest.mark.parametrize("fast,draw,sample_logits", [(False, None, True), (False, None, False), (True, None, True),
                                                     (True, "multinomial", True)])
def test_gpt_sampler_refuses_nonfinite_logits(gpt_bundle, fast, draw, sample_logits):
    vq, gpt = gpt_bundle
    with _poisoned(gpt, "output.weight", (5, 0), math.nan):  # before the sampler: fast mode packs the weights
        with pytest.raises(ValueError, match="GPT sampler are not finite"):
            PARSampler(gpt, vq, fast=fast, draw=draw).sample_tokens(LABELS, cfg_scale=2.0,
                                                                    sample_logits=sample_logits)
    sampler = PARSampler(gpt, vq, fast=fast, draw=draw)
    with pytest.raises(ValueError, match="cfg=1e\\+38"):
        sampler.sample_tokens(LABELS, cfg_scale=1e38)
    tokens = sampler.sample_tokens(LABELS, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.min() >= 0 and tokens.max() < gpt.vocab_size
