"""The models' masked attention through every backend: the VAR training forward (with its gradients), CoDe's
refiner prefill and the GPT's group-causal forward give the same results through varcore's kernel, FlexAttention
(compiled for the CPU) and SDPA with the dense mask; the masks are built once per length and passed down."""
import pytest
import torch

import varcore
from tiny_gpt import one_thread, tiny  # noqa: F401  (one_thread is an autouse fixture)
from tiny_var import tiny_vae, tiny_var
from varcore.ops import attention as att
from varcore.sampling.var import VARSampler

# FlexAttention compiles C++ for each shape on the CPU (minutes on 2 cores): slow tests
BACKENDS = [pytest.param("flex", marks=pytest.mark.slow), "sdpa"] + (
    ["kernel"] if varcore.ops.extension.LIBRARY is not None else [])


def _close(got, want, tol=2e-5):
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"max abs error {err:.3g}"


@pytest.fixture(scope="module")
def var():
    vae = tiny_vae((1, 2, 3, 4))
    return tiny_var(vae, depth=2, width=64)


def _var_inputs(var, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, var.L - var.first_l, var.Cvae, generator=g)
    return torch.randint(0, 10, (3,), generator=g), x


def _var_loss(var, seed):
    var.zero_grad()
    logits = var(*_var_inputs(var, seed))
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in var.parameters() if p.grad is not None]


def test_var_training_mask_built_once(var):
    assert var.block_mask() is var.block_mask(var.L)
    assert torch.equal(var.block_mask().dense(), var.attn_bias_for_masking[0, 0] == 0)  # the official mask
    cut = var.block_mask(8)  # a cut inside a scale: the queries see at most the 8 tokens there are
    assert cut.Lk == 8 and max(cut.ends) == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_var_training_step_same_through_every_backend(var, backend):
    """The training forward and its gradients; FlexAttention has no CPU backward in this torch, so through it the
    forward only."""
    var.train()
    var.cond_drop_rate = 0.0
    want_logits, want_grads = _var_loss(var, 0)  # the default backend
    with att.use_attention_backend(backend):
        if backend == "flex":
            with torch.no_grad():
                logits = var(*_var_inputs(var, 0))
            _close(logits, want_logits)
            return
        logits, grads = _var_loss(var, 0)
    _close(logits, want_logits)
    for g, w in zip(grads, want_grads):
        _close(g, w, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_code_prefill_same_through_every_backend(var, backend):
    """A refiner run from scale 2: its prefill is the masked call; its logits (hence its draws) agree."""
    var.eval()
    sampler = VARSampler(var)
    labels = torch.tensor([1, 7])
    state = sampler.call_state(labels, start=2)
    assert state.visible_end is sampler.call_state(labels, start=2).visible_end  # one mask per start
    hub = torch.randn(2, sum(p * p for p in var.patch_nums[:3]) - 1, var.Cvae, generator=torch.Generator().manual_seed(1))
    opts = sampler.options(1.5, 0, 0.0, 1.0, False)[2]
    from dataclasses import replace

    opts = replace(opts, prefill=True)

    def prefill():
        st = sampler.call_state(labels, start=2)
        return sampler.forward(opts, sampler.first_input(st, hub), None, st)

    with torch.no_grad():
        want = prefill()
        with att.use_attention_backend(backend):
            got = prefill()
    _close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt_group_causal_forward_same_through_every_backend(backend):
    model = tiny(M=2, grid=4)
    idx = torch.randint(0, 16, (2, 15), generator=torch.Generator().manual_seed(2))
    cond = torch.tensor([1, 3])
    assert model.block_mask(18) is model.block_mask(18)
    with torch.no_grad():
        want = model(idx, cond)[0]
        with att.use_attention_backend(backend):
            got = model(idx, cond)[0]
    _close(got, want)
