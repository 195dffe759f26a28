"""CoDe fine-tuning: mask_l forward, drafter and refiner losses, lambda_ep, trainers (KL to the teacher falls), CLI."""
import pytest
import torch
import torch.nn.functional as F

from varcore.models import VAR, VQVAE
from varcore.train.code_trainer import (DrafterTrainer, RefinerTrainer, distillation_kl, drafter_loss,
                                        drafter_scale_weight, main, refiner_loss)
from varcore.train.losses import scale_token_weights, var_loss
from varcore.train.var_trainer import TrainConfig, build_var_for_training

PNS = (1, 2, 3, 4)
EXIT = [1, 5, 14, 30]


def _vae(seed=0):
    torch.manual_seed(seed)
    return VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)


def _teacher(vae, seed=3):
    """A random-weight VAR with confident, input-dependent predictions (all weights matter)."""
    torch.manual_seed(seed)
    var = VAR(vae, num_classes=4, depth=2, embed_dim=64, num_heads=2, attn_l2_norm=True, patch_nums=PNS,
              cond_drop_rate=0.0)
    with torch.no_grad():
        for p in var.parameters():
            p.normal_(0, 1.5 / max(p.shape[-1], 1) ** 0.5)
    return var.eval()


def _pyramids(B=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (B, pn * pn), generator=g) for pn in PNS], torch.arange(B) % 4


# ---------------------------------------------------------------------------------------------- mask_l
@pytest.mark.parametrize("N", [1, 2, 3])
def test_mask_l_forward_is_the_full_forward_prefix(N):
    vae = _vae()
    var = _teacher(vae)
    idx_Bl, labels = _pyramids(B=3)
    x = vae.quantize.idxBl_to_var_input(idx_Bl)
    full = var(labels, x)
    part = var(labels, x, mask_l=EXIT[N - 1])
    assert part.shape == (3, EXIT[N - 1], 64)
    torch.testing.assert_close(part, full[:, :EXIT[N - 1]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mask_l"):
        var(labels, x, mask_l=31)


# ---------------------------------------------------------------------------------------------- losses
def test_drafter_loss_only_sees_its_scales():
    torch.manual_seed(0)
    logits, gt = torch.randn(2, 30, 64), torch.randint(0, 64, (2, 30))
    loss = drafter_loss(logits, gt, PNS, 2)
    ref = F.cross_entropy(logits[:, :5].reshape(-1, 64), gt[:, :5].reshape(-1))
    torch.testing.assert_close(loss, ref)
    gt2 = gt.clone()
    gt2[:, 5:] = (gt2[:, 5:] + 1) % 64  # later scales do not matter
    torch.testing.assert_close(drafter_loss(logits, gt2, PNS, 2), loss)
    torch.testing.assert_close(drafter_loss(logits[:, :5], gt, PNS, 2), loss)  # truncated logits
    weighted = drafter_loss(logits, gt, PNS, 2, scale_weights=(3.0, 1.0))
    torch.testing.assert_close(weighted, var_loss(logits[:, :5], gt[:, :5], scale_token_weights(PNS[:2], (3, 1))))
    with pytest.raises(ValueError, match="draft_steps"):
        drafter_loss(logits, gt, PNS, 4)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_distillation_kl_is_forward_kl_times_t_squared(T):
    torch.manual_seed(1)
    s, t = torch.randn(2, 7, 16, requires_grad=True), torch.randn(2, 7, 16)
    kl = distillation_kl(s, t, T)
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1) * T * T
    torch.testing.assert_close(kl, ref)
    assert (kl > 0).all() and distillation_kl(t, t, T).abs().max() < 1e-5
    kl.sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="T"):
        distillation_kl(s, t, 0.0)


def test_refiner_loss_weights_the_drafter_scales_by_lambda():
    torch.manual_seed(2)
    s, t, gt = torch.randn(3, 30, 16), torch.randn(3, 30, 16), torch.randint(0, 16, (3, 30))
    kl = distillation_kl(s, t, 2.0)
    N = 2
    drafted, refined = kl[:, :EXIT[N - 1]].sum(-1).mean() / 30, kl[:, EXIT[N - 1]:].sum(-1).mean() / 30
    for lam in (1.0, 0.3, 0.0):
        torch.testing.assert_close(refiner_loss(s, t, PNS, N, lam, T=2.0), lam * drafted + refined)
    torch.testing.assert_close(refiner_loss(s, t, PNS, N, 1.0, T=2.0), kl.mean())  # lambda 1: the token mean
    mixed = refiner_loss(s, t, PNS, N, 0.5, T=2.0, gt_BL=gt, alpha=0.25)
    ce = F.cross_entropy(s.reshape(-1, 16), gt.reshape(-1))
    torch.testing.assert_close(mixed, 0.25 * (0.5 * drafted + refined) + 0.75 * ce)
    with pytest.raises(ValueError, match="gt_BL"):
        refiner_loss(s, t, PNS, N, 0.5, alpha=0.5)
    with pytest.raises(ValueError, match="lambda_ep"):
        refiner_loss(s, t, PNS, N, 1.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_lambda_schedules_decay_from_one_to_zero(schedule):
    values = [drafter_scale_weight(i / 20, schedule, stage1_frac=0.6) for i in range(21)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))
    if schedule == "step":
        assert values[11] == 1.0 and values[12] == 0.0
    assert drafter_scale_weight(0.7, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        drafter_scale_weight(0.5, "exp")


# ---------------------------------------------------------------------------------------------- trainers
def test_refiner_kl_to_the_teacher_falls():
    vae = _vae()
    teacher = _teacher(vae)
    torch.manual_seed(4)
    student = build_var_for_training(vae, depth=1, num_classes=4, width=32, heads=2, cond_drop_rate=0.1)
    config = TrainConfig(max_iters=60, lr=3e-3, warmup_iters=0, weight_decay=0.0, grad_clip=0.0)
    trainer = RefinerTrainer(vae, student, config, teacher, draft_steps=2, kd_temperature=1.0,
                             lambda_schedule="linear")
    idx_Bl, labels = _pyramids(B=8)
    before = trainer.teacher_kl(labels, idx_Bl)
    lambdas = []
    for _ in range(config.max_iters):
        lambdas.append(trainer.lambda_ep)
        trainer.train_step(labels, idx_Bl=idx_Bl)
    after = trainer.teacher_kl(labels, idx_Bl)
    assert after["kl"] < 0.5 * before["kl"], (before, after)
    assert after["kl_refine_scales"] < 0.5 * before["kl_refine_scales"]
    assert lambdas[0] == 1.0 and lambdas[-1] < 0.05 and lambdas == sorted(lambdas, reverse=True)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_refiner_teacher_and_student_share_the_dropped_labels():
    vae = _vae()
    teacher = _teacher(vae)
    torch.manual_seed(5)
    student = build_var_for_training(vae, depth=1, num_classes=4, width=32, heads=2, cond_drop_rate=1.0)
    trainer = RefinerTrainer(vae, student, TrainConfig(max_iters=10), teacher, draft_steps=3)
    idx_Bl, labels = _pyramids(B=2)
    gt, x = trainer._teacher_forcing(idx_Bl, None)
    student.train()
    loss, _, _ = trainer._loss(student, labels, gt, x)
    assert student.cond_drop_rate == 1.0  # restored
    null = torch.full_like(labels, 4)
    student.eval()
    ref = refiner_loss(student(null, x), teacher(null, x), PNS, 3, 1.0)
    torch.testing.assert_close(loss, ref)


def test_drafter_trainer_learns_its_prefix_only():
    vae = _vae()
    torch.manual_seed(6)
    var = build_var_for_training(vae, depth=2, num_classes=4, width=64, heads=2, cond_drop_rate=0.0)
    trainer = DrafterTrainer(vae, var, TrainConfig(max_iters=30, lr=3e-3, grad_clip=0.0), draft_steps=3)
    idx_Bl, labels = _pyramids(B=4)
    first = trainer.eval_step(labels, idx_Bl=idx_Bl)
    for _ in range(30):
        metrics = trainer.train_step(labels, idx_Bl=idx_Bl)
    last = trainer.eval_step(labels, idx_Bl=idx_Bl)
    assert last["loss"] < 0.5 * first["loss"] and metrics["acc"] > 50
    gt, x = trainer._teacher_forcing(idx_Bl, None)
    _, logits, target = trainer._loss(var, labels, gt, x)
    assert logits.shape[1] == EXIT[2] and torch.equal(target, gt[:, :EXIT[2]])
    # the last scale's head inputs were never trained on: its tokens stay at chance
    var.eval()
    with torch.no_grad():
        tail = var(labels, x)[:, EXIT[2]:].argmax(-1)
    assert (tail == gt[:, EXIT[2]:]).float().mean() < 0.3


def test_trainers_refuse_bad_setups():
    vae = _vae()
    var = build_var_for_training(vae, depth=1, num_classes=4, width=32, heads=2)
    with pytest.raises(ValueError, match="draft_steps"):
        DrafterTrainer(vae, var, TrainConfig(max_iters=1), draft_steps=4)
    other = _teacher(VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=PNS))
    with pytest.raises(ValueError, match="vocabularies differ"):
        RefinerTrainer(vae, var, TrainConfig(max_iters=1), other, draft_steps=2)
    with pytest.raises(ValueError, match="schedule"):
        RefinerTrainer(vae, var, TrainConfig(max_iters=1), _teacher(vae), draft_steps=2, lambda_schedule="exp")


# ---------------------------------------------------------------------------------------------- command line
def test_cli_drafter_and_refiner(tmp_path):
    vae = _vae()
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    torch.save(_teacher(vae).state_dict(), tmp_path / "teacher.pth")
    idx_Bl, labels = _pyramids(B=4)
    torch.save({"idx_BL": torch.cat(idx_Bl, dim=1), "labels": labels}, tmp_path / "tok.pt")
    common = ["--vae", str(tmp_path / "vae.pth"), "--tokens", str(tmp_path / "tok.pt"), "--pn", "1_2_3_4",
              "--depth", "1", "--width", "32", "--heads", "2", "--num-classes", "4", "--bs", "2", "--lr", "1e-3",
              "--workers", "0", "--no-progress", "--iters", "2", "--draft-steps", "2"]
    history = main(common + ["--role", "drafter", "--out", str(tmp_path / "d")])
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    history = main(common + ["--role", "refiner", "--teacher", str(tmp_path / "teacher.pth"), "--kd-temp", "2",
                             "--lambda-schedule", "step", "--out", str(tmp_path / "r")])
    assert len(history) == 2
    assert torch.load(tmp_path / "r" / "ckpt-last.pth", weights_only=True)["iter"] == 2
    with pytest.raises(SystemExit):
        main(common + ["--role", "refiner", "--out", str(tmp_path / "x")])
