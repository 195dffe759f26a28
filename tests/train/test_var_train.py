"""VAR training: loss, schedules, parameter groups, the trainer (it must learn), checkpoints and the CLI."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from varcore.models import VQVAE
from varcore.train import TrainConfig, VARTrainer, scale_token_weights, var_loss
from varcore.train.data import ImageFolder, TokenPyramids, split_scales
from varcore.train.schedule import lr_factor, param_groups, weight_decay_at
from varcore.train.var_trainer import build_var_for_training, main

PNS = (1, 2, 3, 4)
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny_models(cond_drop_rate=0.0, seed=0):
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    var = build_var_for_training(vae, depth=2, num_classes=4, width=128, heads=2, cond_drop_rate=cond_drop_rate)
    return vae, var


def pyramids(N=4, V=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (N, pn * pn), generator=g) for pn in PNS], torch.arange(N) % 4


# ---------------------------------------------------------------- loss and schedule
def test_default_loss_is_token_mean_cross_entropy():
    torch.manual_seed(0)
    logits, gt = torch.randn(3, 30, 16), torch.randint(0, 16, (3, 30))
    w = scale_token_weights(PNS)
    assert w.shape == (1, 30) and torch.allclose(w, torch.full((1, 30), 1 / 30))
    ref = F.cross_entropy(logits.reshape(-1, 16), gt.reshape(-1))
    torch.testing.assert_close(var_loss(logits, gt, w), ref)
    ref_ls = F.cross_entropy(logits.reshape(-1, 16), gt.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(var_loss(logits, gt, w, label_smoothing=0.1), ref_ls)


def test_scale_weights():
    torch.manual_seed(0)
    logits, gt = torch.randn(2, 30, 16), torch.randint(0, 16, (2, 30))
    w = scale_token_weights(PNS, [0, 0, 0, 1])  # only the last scale counts
    ref = F.cross_entropy(logits[:, 14:].reshape(-1, 16), gt[:, 14:].reshape(-1))
    torch.testing.assert_close(var_loss(logits, gt, w), ref)
    assert torch.isclose(scale_token_weights(PNS, [1, 2, 3, 4]).sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale_weights"):
        scale_token_weights(PNS, [1, 1])
    with pytest.raises(ValueError, match="scale_weights"):
        scale_token_weights(PNS, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="token_weight_1L"):
        var_loss(logits, gt, w[:, :5])


@pytest.mark.parametrize("schedule", ["lin0", "lin", "cos"])
def test_lr_schedule_shape(schedule):
    max_it, wp = 200, 20
    f = [lr_factor(i, max_it, wp, wp0=0.005, wpe=0.1, schedule=schedule) for i in range(max_it)]
    assert f[0] == pytest.approx(0.005) and max(f) == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(f[:wp], f[1:wp + 1]))  # warm-up rises
    assert all(a >= b - 1e-12 for a, b in zip(f[wp:], f[wp + 1:]))  # then never rises
    assert f[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 1, schedule="step")


def test_weight_decay_anneals():
    assert weight_decay_at(0, 100, 0.05, 0.08) == pytest.approx(0.05)
    assert weight_decay_at(99, 100, 0.05, 0.08) == pytest.approx(0.08)
    assert weight_decay_at(50, 100, 0.05, 0.05) == pytest.approx(0.05)


def test_param_groups_exempt_embeddings_and_biases():
    _, var = tiny_models()
    groups = param_groups(var)
    no_wd = {id(p) for g in groups if g["wd_sc"] == 0 for p in g["params"]}
    named = dict(var.named_parameters())
    for name in ("pos_start", "pos_1LC", "lvl_embed.weight", "head.bias", "blocks.0.attn.scale_mul_1H11",
                 "blocks.0.attn.q_bias"):
        assert id(named[name]) in no_wd, name
    for name in ("head.weight", "blocks.0.attn.mat_qkv.weight", "class_emb.weight", "word_embed.weight"):
        assert id(named[name]) not in no_wd, name
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_iters"):
        TrainConfig(max_iters=0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(max_iters=1, amp="fp8")
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(max_iters=1, label_smoothing=1.0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(max_iters=1, schedule="exp")
    vae, var = tiny_models()
    with pytest.raises(TypeError, match="config"):
        VARTrainer(vae, var, {"max_iters": 1})
    with pytest.raises(ValueError, match="vae"):
        VARTrainer(VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=PNS), var,
                   TrainConfig(max_iters=1))
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=1))
    with pytest.raises(ValueError, match="exactly one"):
        trainer.train_step(torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- the trainer learns
def test_overfits_a_few_token_pyramids():
    vae, var = tiny_models()
    idx_Bl, labels = pyramids()
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=60, lr=3e-3, warmup_iters=5, weight_decay=0.0))
    before = trainer.eval_step(labels, idx_Bl=idx_Bl)
    history = [trainer.train_step(labels, idx_Bl=idx_Bl) for _ in range(60)]
    after = trainer.eval_step(labels, idx_Bl=idx_Bl)
    assert before["loss"] > 0.8 * math.log(64)  # starts near chance
    assert after["loss"] < 0.1 * before["loss"]
    assert after["acc"] > 95 and before["acc"] < 20
    assert all(math.isfinite(h["grad_norm"]) for h in history) and trainer.it == 60
    assert history[0]["lr"] == pytest.approx(3e-3 * 0.005)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(amp):
    vae, var = tiny_models()
    idx_Bl, labels = pyramids()
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=8, lr=3e-3, amp=amp, weight_decay=0.0))
    first = trainer.eval_step(labels, idx_Bl=idx_Bl)["loss"]
    for _ in range(8):
        metrics = trainer.train_step(labels, idx_Bl=idx_Bl)
        assert math.isfinite(metrics["loss"])
    assert trainer.eval_step(labels, idx_Bl=idx_Bl)["loss"] < first
    assert (trainer.scaler is not None) == (amp == "fp16")


def test_train_from_images():
    vae, var = tiny_models()
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=2))
    img = torch.rand(2, 3, PNS[-1] * vae.downsample, PNS[-1] * vae.downsample) * 2 - 1
    metrics = trainer.train_step(torch.tensor([0, 1]), img_B3HW=img)
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["acc"] <= 100


def test_checkpoint_resume_is_exact(tmp_path):
    idx_Bl, labels = pyramids()
    config = dict(max_iters=6, lr=1e-3, warmup_iters=2)
    vae, var = tiny_models()
    straight = VARTrainer(vae, var, TrainConfig(**config))
    for _ in range(6):
        straight.train_step(labels, idx_Bl=idx_Bl)

    vae, var = tiny_models()
    first = VARTrainer(vae, var, TrainConfig(**config))
    for _ in range(3):
        first.train_step(labels, idx_Bl=idx_Bl)
    first.save_checkpoint(tmp_path / "ckpt.pth", args={"note": "test"})
    vae, var = tiny_models()  # the same frozen VAE (it is not in the checkpoint) ...
    torch.manual_seed(123)
    var.init_weights(init_std=-1)  # ... but other VAR weights: everything must come from the checkpoint
    resumed = VARTrainer(vae, var, TrainConfig(**config))
    ckpt = resumed.load_checkpoint(tmp_path / "ckpt.pth")
    assert resumed.it == 3 and ckpt["args"] == {"note": "test"}
    for _ in range(3):
        resumed.train_step(labels, idx_Bl=idx_Bl)
    for (name, a), b in zip(straight.var.state_dict().items(), resumed.var.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------- data
def test_token_pyramids_and_split(tmp_path):
    idx_Bl, labels = pyramids(N=3)
    torch.save({"idx_BL": torch.cat(idx_Bl, dim=1), "labels": labels}, tmp_path / "tok.pt")
    ds = TokenPyramids(tmp_path / "tok.pt")
    assert len(ds) == 3
    idx_L, label = ds[1]
    assert label == labels[1]
    assert all(torch.equal(a, b[1:2]) for a, b in zip(split_scales(idx_L[None], PNS), idx_Bl))
    with pytest.raises(ValueError, match="idx_BL"):
        TokenPyramids({"labels": labels})
    with pytest.raises(ValueError, match="idx_BL"):
        split_scales(idx_L[None, :5], PNS)


def test_image_folder(tmp_path):
    from PIL import Image
    for c, size in (("cat", (40, 30)), ("dog", (20, 50))):
        (tmp_path / c).mkdir()
        Image.new("RGB", size, (255, 0, 0)).save(tmp_path / c / "a.png")
    ds = ImageFolder(tmp_path, reso=16, train=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    img, label = ds[1]
    assert img.shape == (3, 16, 16) and label == 1
    torch.testing.assert_close(img[0], torch.ones(16, 16))  # red -> +1, others -> -1
    torch.testing.assert_close(img[1], -torch.ones(16, 16))
    with pytest.raises(ValueError, match="root"):
        ImageFolder(tmp_path / "nope", reso=16)


# ---------------------------------------------------------------- command line
def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "varcore.train.var_trainer", "--help"], capture_output=True,
                         text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--vae", "--tokens", "--data", "--iters", "--amp", "--ls", "--scale-weights", "--out"):
        assert flag in out.stdout


def test_cli_trains_and_resumes(tmp_path):
    vae, _ = tiny_models()
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    idx_Bl, labels = pyramids(N=4)
    torch.save({"idx_BL": torch.cat(idx_Bl, dim=1), "labels": labels}, tmp_path / "tok.pt")
    common = ["--vae", str(tmp_path / "vae.pth"), "--tokens", str(tmp_path / "tok.pt"), "--pn", "1_2_3_4",
              "--depth", "2", "--width", "64", "--heads", "2", "--num-classes", "4", "--bs", "2",
              "--lr", "1e-3", "--workers", "0", "--out", str(tmp_path / "run"), "--no-progress",
              "--scale-weights", "1,1,1,2"]
    history = main(common + ["--iters", "3"])
    assert len(history) == 3
    ckpt = torch.load(tmp_path / "run" / "ckpt-last.pth", weights_only=True)
    assert ckpt["iter"] == 3 and "var_wo_ddp" in ckpt["trainer"]
    history = main(common + ["--iters", "5"])
    assert len(history) == 2  # resumed at step 3
    assert torch.load(tmp_path / "run" / "ckpt-last.pth", weights_only=True)["iter"] == 5
