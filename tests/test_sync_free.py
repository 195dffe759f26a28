"""No host synchronisation in a sampling or training step: the accelerator paths, run on the CPU.

An accelerator (a GPU) waits whenever the host reads one of its tensors' values (``aten._local_scalar_dense``:
``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``). varcore's per-call paths check values on the device there
(``varcore.ops.value_checks``). With ``HOST_DEVICES`` emptied, the CPU takes those same paths, so a dispatch mode
can count every value the Python layer reads. The compiled kernels' own checks are tested through the emulated
CUDA kernels (``varcore_simt``), whose glue, as on a GPU, reads no values.
"""
import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tiny_gpt import one_thread, tiny  # noqa: F401  (one_thread is an autouse fixture)
from tiny_var import tiny_var, tiny_vae
from varcore.ops import value_checks
from varcore.sampling.code import CoDeSampler
from varcore.sampling.draw import inverse_cdf_sample
from varcore.sampling.par import PARSampler
from varcore.sampling.var import VARSampler
from varcore.train.gpt_trainer import GPTTrainer
from varcore.train.var_trainer import TrainConfig, VARTrainer, host_metrics

PATCH_NUMS = (1, 2, 3, 4)


class HostReads(TorchDispatchMode):
    """Counts the values read on the host, by the varcore function that read them."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if "/varcore/" in f.filename]
            self.where[frames[-1].name if frames else "?"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_paths(monkeypatch):
    """The CPU treated as an accelerator: value checks on the device, fused optimisers."""
    monkeypatch.setattr(value_checks, "HOST_DEVICES", frozenset())


def _vae(seed=0):
    return tiny_vae(PATCH_NUMS, seed)


def _var(vae, depth=2, width=64, seed=1):
    return tiny_var(vae, depth, width, seed)


def _reads(fn):
    fn()  # warm-up: lazy initialisation may read values once
    mode = HostReads()
    with mode:
        out = fn()
    return mode.where, out


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("dtype, prune, kv_budget, draw", [
    (torch.float32, None, None, "multinomial"), (torch.bfloat16, None, None, "multinomial"),
    (torch.float32, {2: 0.5, 3: 0.5}, None, "multinomial"),
    (torch.float32, None, {1: 0.6, 2: (0.3, 0.5)}, "multinomial"), (torch.bfloat16, {3: 0.5}, {2: 0.4}, "multinomial"),
    (torch.float32, {3: 0.5}, {2: 0.4}, "inverse_cdf")])
def test_var_sampler_reads_one_value_per_call(device_paths, dtype, prune, kv_budget, draw):
    """Every scale's step reads nothing (token pruning's choice and restoration, KV-cache compression's scores and
    compaction, the inverse-CDF draw included); the call reads one flag at its end: whether any logits were not
    finite (raise_if_nonfinite), after all the work is queued."""
    var = _var(_vae()).eval()
    sampler = VARSampler(var, dtype=dtype)
    where, _ = _reads(lambda: sampler.sample(3, torch.tensor([1, 2, 3]), g_seed=0, top_k=9, top_p=0.9,
                                             more_smooth=True, prune=prune, kv_budget=kv_budget, draw=draw,
                                             output="tokens"))
    assert where == {"raise_if_nonfinite": 1}


@pytest.mark.parametrize("prune, kv_budget, draw", [(None, None, "multinomial"),
                                                    ({1: 0.5, 2: 0.5, 3: 0.5}, None, "multinomial"),
                                                    ({3: 0.5}, {1: 0.5, 2: 0.5}, "multinomial"),
                                                    ({3: 0.5}, None, "inverse_cdf")])
def test_code_sampler_reads_one_value_per_stage(device_paths, prune, kv_budget, draw):
    """The drafter's scales, the refiner's block-causal prefill and its scales read nothing but one flag per
    stage (also with token pruning, in the prefill too, and KV-cache compression, of the prefill too)."""
    vae = _vae()
    drafter, refiner = _var(vae, depth=3, seed=2).eval(), _var(vae, depth=2, seed=3).eval()
    sampler = CoDeSampler(drafter, refiner, draft_steps=2)
    where, _ = _reads(lambda: sampler.sample(2, torch.tensor([4, 5]), g_seed=0, prune=prune, kv_budget=kv_budget,
                                             draw=draw, output="tokens"))
    assert where == {"raise_if_nonfinite": 2}


@pytest.mark.parametrize("order", ["raster", "par"])
@pytest.mark.parametrize("fast", [False, True])
def test_par_sampler_reads_one_value_per_call(device_paths, order, fast):
    sampler = PARSampler(tiny(), fast=fast)
    where, _ = _reads(lambda: sampler.sample_tokens([1, 2], cfg_scale=1.5, top_k=5, order=order))
    assert where == {"raise_if_nonfinite": 1}


# ---------------------------------------------------------------------------------------------- training
def _var_trainer():
    vae = _vae()
    var = _var(vae)
    return VARTrainer(vae, var, TrainConfig(max_iters=10, warmup_iters=2))


def _pyramid(seed, B=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (B, pn * pn), generator=g) for pn in PATCH_NUMS]


@pytest.mark.parametrize("prog_si", [None, 1])
def test_var_training_step_reads_no_value(device_paths, prog_si):
    trainer = _var_trainer()
    assert trainer.optimizer.defaults["fused"]
    labels = torch.tensor([1, 7])
    where, metrics = _reads(lambda: trainer.step(labels, idx_Bl=_pyramid(0), prog_si=prog_si))
    assert where == {}
    for name in ("loss", "acc", "grad_norm"):
        assert isinstance(metrics[name], torch.Tensor) and metrics[name].dim() == 0, name
    floats = host_metrics(metrics)
    assert all(isinstance(v, (int, float)) for v in floats.values()) and floats["loss"] > 0


def test_gpt_training_step_reads_no_value(device_paths):
    trainer = GPTTrainer(tiny().train(), TrainConfig(max_iters=10, warmup_iters=2))
    codes = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    where, metrics = _reads(lambda: trainer.step(torch.tensor([0, 3]), codes))
    assert where == {}
    assert isinstance(metrics["loss"], torch.Tensor) and float(metrics["loss"]) > 0


def test_device_step_matches_host_step():
    """The sync-free step (fused AdamW, metrics on the device) trains as the CPU's step does, to rounding."""
    runs = []
    for device_like in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if device_like:
                mp.setattr(value_checks, "HOST_DEVICES", frozenset())
            trainer = _var_trainer()
            losses = [trainer.train_step(torch.tensor([1, 7]), idx_Bl=_pyramid(s))["loss"] for s in range(4)]
            runs.append((losses, [p.detach().clone() for p in trainer.var.parameters()]))
    (host_losses, host_params), (dev_losses, dev_params) = runs
    assert host_losses == pytest.approx(dev_losses, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(host_params, dev_params))


def test_nonfinite_loss_skips_the_update_on_the_device(device_paths, monkeypatch):
    """On an accelerator a NaN loss cannot raise before the update without a host read: the fused step skips
    it on the device (weights, moments and step count unchanged), and train_step raises when it reads the loss."""
    trainer = _var_trainer()
    labels = torch.tensor([1, 7])
    trainer.train_step(labels, idx_Bl=_pyramid(0))
    before = [p.detach().clone() for p in trainer.var.parameters()]
    state_steps = [float(s["step"]) for s in trainer.optimizer.state.values()]
    quantize, teacher_input = trainer.vae.quantize, trainer.vae.quantize.idxBl_to_var_input

    def poisoned(idx_Bl):  # a NaN in the data
        x = teacher_input(idx_Bl)
        x[0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(quantize, "idxBl_to_var_input", poisoned)
    with pytest.raises(FloatingPointError, match="update was skipped"):
        trainer.train_step(labels, idx_Bl=_pyramid(1))
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.var.parameters()))
    assert [float(s["step"]) for s in trainer.optimizer.state.values()] == state_steps


# ---------------------------------------------------------------------------------------------- the checks
def test_device_value_checks_fail_without_a_host_read(device_paths):
    """Out-of-range values still fail on the device path (torch._assert_async: on the CPU at once, on a GPU at
    the next synchronisation), with the argument's name; nothing is read on the host."""
    var = _var(_vae()).eval()
    mode = HostReads()
    with mode, pytest.raises(RuntimeError, match="label_B values must be in"):
        var(torch.tensor([3, 11]), torch.zeros(2, var.L - 1, var.Cvae))
    with mode, pytest.raises(RuntimeError, match=r"ms_idx_Bl\[1\] values must be in \[0, 64\)"):
        var.vae_proxy[0].idxBl_to_img([torch.zeros(1, 1, dtype=torch.long), torch.full((1, 4), 64)], same_shape=True)
    assert mode.where == {}


def test_inverse_cdf_flags_bad_rows_on_the_device():
    """With a flag, a NaN or all-zero row is reported on the device and still draws an index in [0, V)."""
    weights = torch.tensor([[0.2, 0.8, 0.0], [float("nan"), 1.0, 1.0], [0.0, 0.0, 0.0]])
    for rows, bad in (([0], False), ([0, 1], True), ([0, 2], True)):
        flag = torch.zeros((), dtype=torch.bool)
        mode = HostReads()
        with mode:
            idx = inverse_cdf_sample(weights[rows], generator=torch.Generator().manual_seed(0), nonfinite=flag)
        assert mode.where == {} and bool(flag) == bad
        assert idx.shape == (len(rows), 1) and 0 <= int(idx.min()) and int(idx.max()) < 3
    with pytest.raises(ValueError, match="finite, non-negative and not all zero"):
        inverse_cdf_sample(weights[[0, 2]])


def test_host_value_checks_raise_value_errors():
    var = _var(_vae()).eval()
    with pytest.raises(ValueError, match=r"label_B values must be in \[0, 11\), got \[3, 12\]"):
        var(torch.tensor([3, 12]), torch.zeros(2, var.L - 1, var.Cvae))


# ---------------------------------------------------------------------------------------------- compiled
def test_training_forward_backward_compiles_as_one_graph():
    """The training forward with the block-causal mask and its loss trace with fullgraph=True; the backward
    (AOTAutograd's) gives the eager gradients."""
    vae = _vae()
    var = _var(vae).train()
    labels, x = torch.tensor([1, 7]), vae.quantize.idxBl_to_var_input(_pyramid(0))
    gt = torch.cat(_pyramid(0), dim=1)

    def loss_fn(labels, x):
        logits = var(labels, x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), gt.reshape(-1))

    var.cond_drop_rate = 0.0  # no random class dropout (no drop-path or dropout either: the defaults are 0)
    eager = loss_fn(labels, x)
    eager.backward()
    grads = [p.grad.clone() for p in var.parameters()]
    var.zero_grad(set_to_none=True)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(labels, x)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    assert all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6) for p, g in zip(var.parameters(), grads))


def test_code_prefill_compiles_as_one_graph():
    """CoDe's refiner prefill (block-causal over scales 0..N) and the following scales trace with fullgraph=True
    (aot_eager keeps the ops, so the tokens stay exact)."""
    vae = _vae()
    drafter, refiner = _var(vae, depth=3, seed=2).eval(), _var(vae, depth=2, seed=3).eval()
    kwargs = dict(g_seed=0, top_k=9, output="tokens")
    ref = CoDeSampler(drafter, refiner, draft_steps=2).sample(2, torch.tensor([4, 5]), **kwargs)
    torch._dynamo.reset()
    toks = CoDeSampler(drafter, refiner, draft_steps=2, compile={"backend": "aot_eager"}).sample(
        2, torch.tensor([4, 5]), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(toks, ref))
