"""Determinism on the CPU: the same seed gives bit-identical outputs, call after call and process after process.

Covered: the compiled ops (attention forward and backward, PAR order, nearest code, and through the VQVAE and the
samplers the encode pyramid, the decode and the sampler step), the VAR, CoDe and PAR samplers (images and tokens)
and training steps (weights after the steps). Each fingerprint is a SHA-256 over the raw bytes of the outputs; a
fresh interpreter must give the fingerprints of the test process, and a repeated call in one process must agree
too. What holds on GPUs is in docs/robustness.md.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, (list, tuple)):
            h.update(_digest(*t).encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprints() -> dict:
    """SHA-256 of each component's outputs for fixed seeds (the function the subprocesses run)."""
    from varcore.models import VAR, VQVAE
    from varcore.models.gpt import ModelArgs, Transformer
    from varcore.ops import attention as att, par_order as po, quant as q
    from varcore.sampling.code import CoDeSampler
    from varcore.sampling.par import PARSampler
    from varcore.sampling.var import VARSampler
    from varcore.train.var_trainer import TrainConfig, VARTrainer

    out = {}
    g = torch.Generator().manual_seed(1234)
    # ops: attention forward + backward through autograd, with enough rows for several threads
    q_, k_, v_ = (torch.randn(2, 4, 96, 32, generator=g).requires_grad_() for _ in range(3))
    ends = torch.repeat_interleave(torch.tensor([16, 48, 96], dtype=torch.int32), torch.tensor([16, 32, 48]))
    o = att.block_causal_attention(q_, k_, v_, ends)[0]
    o.square().sum().backward()
    out["attention"] = _digest(o, q_.grad, k_.grad, v_.grad)
    x = torch.randint(0, 1000, (3, 24, 24), generator=g)
    out["par_order"] = _digest(po.par_gather(x, 2), po.par_scatter(po.par_gather(x, 4), 4))
    z, e = torch.randn(4000, 32, generator=g), torch.randn(512, 32, generator=g)
    out["nearest_code"] = _digest(q.nearest_code(z, e), q.nearest_code(z, e, using_znorm=True))

    torch.manual_seed(0)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4), ch_mult=(1, 1))
    var = VAR(vae, num_classes=10, depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4))
    small = VAR(vae, num_classes=10, depth=1, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4))
    with torch.no_grad():
        for p in [*var.parameters(), *small.parameters()]:
            p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5)
    img = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    out["vqvae_encode"] = _digest(vae.img_to_idxBl(img), vae.img_to_reconstructed_img(img, last_one=True))
    sampler = VARSampler(var.eval())
    out["var_sampler"] = _digest(*sampler.sample(4, None, g_seed=5, cfg=2.0, top_k=20, top_p=0.9, output="both"))
    out["var_sampler_per_image"] = _digest(sampler.sample(3, 2, g_seed=5, per_image_seeds=True, more_smooth=True))
    out["var_drop_in"] = _digest(var.autoregressive_infer_cfg(2, None, g_seed=9, cfg=1.5, top_k=10))
    out["code"] = _digest(CoDeSampler(var, small.eval(), 2).sample(2, 1, g_seed=3, cfg=1.5, top_k=12))
    gpt = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=5, block_size=16,
                                spe_token_num=3, ar_token_num=4)).eval()
    out["par_sampler"] = _digest(PARSampler(gpt).sample_tokens([0, 3, 4], cfg_scale=2.0, top_k=8,
                                                               generator=torch.Generator().manual_seed(2)))
    # training: a few steps with class dropout and drop path on (they draw from the seeded global RNG)
    torch.manual_seed(7)
    train_var = VAR(vae, num_classes=10, depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4),
                    drop_path_rate=0.1, cond_drop_rate=0.2)
    trainer = VARTrainer(vae, train_var, TrainConfig(max_iters=2, lr=1e-3))
    for step in range(2):
        idx = [torch.randint(0, 64, (4, pn * pn), generator=g) for pn in (1, 2, 3, 4)]
        trainer.train_step(torch.randint(0, 10, (4,), generator=g), idx_Bl=idx)
    out["var_training"] = _digest(*train_var.state_dict().values())
    return out


def _in_subprocess(threads: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(TESTS)!r}); import torch; torch.set_num_threads({threads}); "
            "from test_determinism import fingerprints; print(json.dumps(fingerprints()))")
    env = {k: v for k, v in os.environ.items() if k != "VARCORE_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def here():
    """This process's fingerprints, with the subprocesses' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield fingerprints()
    finally:
        torch.set_num_threads(threads)


def test_same_seed_bit_identical_across_processes(here):
    other = _in_subprocess(2)
    assert here.keys() == other.keys() and len(here) == 10
    assert here == other, {k for k in here if here[k] != other[k]}


def test_same_seed_bit_identical_within_a_process(here):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = fingerprints()
    finally:
        torch.set_num_threads(threads)
    assert again == here, {k for k in here if here[k] != again[k]}


def test_a_different_seed_changes_the_fingerprint():
    """The digests see the outputs: one changed bit changes them."""
    t = torch.randn(5, 3)
    u = t.clone()
    u.view(torch.int32)[2, 1] ^= 1
    assert _digest(t) != _digest(u) and _digest(t) == _digest(t.clone())


@pytest.mark.slow
def test_thread_count_does_not_change_the_kernels():
    """The compiled ops partition work over rows, never over a reduction: 1 and 2 threads agree bit for bit."""
    one, two = _in_subprocess(1), _in_subprocess(2)
    for key in ("attention", "par_order", "nearest_code"):
        assert one[key] == two[key], key
