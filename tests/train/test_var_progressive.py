"""Progressive training as the official VAR code does it: ``prog_si`` in the quantiser and in ``VAR.forward``, the
``--pg``/``--pg0``/``--pgwp`` schedule, the loss weights and the warm-up of a newly added scale.

The numbers below are facts recorded from the official FoundationVision/VAR code (its ``VARTrainer.train_step``,
its ``train.py`` schedule and ``lr_wd_annealing``) run on the CPU in float32 on the golden ``var-small`` weights:
2 images and labels from ``expected.pt``, VAR built with ``cond_drop_rate=0.1`` and no drop-path, AdamW
(betas 0.9/0.95, the official parameter groups, peak lr 1e-3, weight decay 0.05 throughout, clip 2), 20 steps
(``ep=2`` of 10 iterations, ``wp=0.3`` epochs so 3 warm-up steps, wp0 0.005, wpe 0.01), ``pg=0.8``, ``pg0=1``,
``pgwp=0.2`` epochs (2 steps), the same batch every step, ``torch.manual_seed(0)`` before the first step.
"""

import pytest
import torch

from varcore.models import VQVAE
from varcore.train import TrainConfig, VARTrainer
from varcore.train.code_trainer import DrafterTrainer
from varcore.train.schedule import lr_factor, prog_si_at, prog_warmup, progressive_schedule
from conftest import load_expected, load_var_small

PNS = (1, 2, 3, 4)

# ---- facts from the official run described above (per step)
OFFICIAL_PROG_SI = [1] * 7 + [2] * 6 + [3] * 7
OFFICIAL_LOGITS_L = [5] * 7 + [14] * 6 + [30] * 7
OFFICIAL_PROG_WP = [1] * 7 + [0.5] + [1] * 5 + [0.5] + [1] * 6
OFFICIAL_LR = [5e-06, 0.0003366666666666667, 0.0006683333333333334, 0.001, 0.0009690625000000001, 0.000938125,
               0.0009071875, 0.00087625, 0.0008453125, 0.000814375, 0.0007834375000000001, 0.0007524999999999999,
               0.0007215625, 0.000690625, 0.0006596875, 0.00062875, 0.0005668750000000001, 0.0003812500000000001,
               0.00019562500000000005, 1e-05]
OFFICIAL_LOSS = [0.6914213, 0.7203285, 0.5877991, 0.4137432, 0.2591682, 0.1914606, 0.2035596, 0.8353853, 1.4192536,
                 1.2514225, 1.0846238, 0.9467465, 0.8339025, 3.4023147, 2.9961772, 2.846565, 2.6897244, 2.7364805,
                 2.4425905, 2.3885455]
OFFICIAL_GRAD_NORM = [1.5495726, 1.5599295, 1.4339583, 1.1185598, 0.7027177, 0.5022702, 0.6133329, 1.1036712,
                      1.993508, 1.7493116, 1.4503536, 1.2588918, 1.1557355, 2.907546, 2.0448186, 1.9342912, 1.865463,
                      2.4430051, 1.7694384, 1.7408404]
OFFICIAL_FINAL_HEAD_BIAS_SUM = -0.7764676213264465
# ---- facts of the official quantiser with prog_si = 0..3 on the golden images: token-map lengths per scale
# and the shape of idxBl_to_var_input (None at prog_si 0)
OFFICIAL_PROG_LENS = {0: [1], 1: [1, 4], 2: [1, 4, 9], 3: [1, 4, 9, 16]}
OFFICIAL_PROG_X = {0: None, 1: (2, 4, 8), 2: (2, 13, 8), 3: (2, 29, 8)}


@pytest.fixture()
def golden(golden_dir):
    vae, var, _ = load_var_small(golden_dir)
    return vae, var, load_expected(golden_dir / "var-small")


# ---------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("prog_si", [0, 1, 2, 3])
def test_quantiser_and_forward_on_the_first_scales(golden, prog_si):
    vae, var, expected = golden
    var.eval()  # no class dropout (the golden logits were taken with cond_drop_rate 0)
    vae.quantize.prog_si = var.prog_si = prog_si
    idx_Bl = vae.img_to_idxBl(expected["img"])
    assert [t.shape[1] for t in idx_Bl] == OFFICIAL_PROG_LENS[prog_si]
    assert all(torch.equal(a, b) for a, b in zip(idx_Bl, expected["idx_Bl"]))
    x_BLCv = vae.quantize.idxBl_to_var_input(idx_Bl)
    assert (None if x_BLCv is None else tuple(x_BLCv.shape)) == OFFICIAL_PROG_X[prog_si]
    if x_BLCv is None:
        x_BLCv = torch.zeros(2, 0, 8)
    else:  # the truncated input is the prefix of the full one
        vae.quantize.prog_si = -1
        full = vae.quantize.idxBl_to_var_input(expected["idx_Bl"])
        torch.testing.assert_close(x_BLCv, full[:, :x_BLCv.shape[1]], atol=0, rtol=0)
    with torch.no_grad():
        logits = var(expected["labels"], x_BLCv)
    ed = var.begin_ends[prog_si][1]
    assert logits.shape == (2, ed, 64)
    torch.testing.assert_close(logits, expected["logits_BLV"][:, :ed], atol=1e-5, rtol=0)


def test_forward_checks_progressive_inputs(golden):
    vae, var, expected = golden
    x = vae.quantize.idxBl_to_var_input(expected["idx_Bl"])
    var.prog_si = 1
    with pytest.raises(ValueError, match=r"x_BLCv_wo_first_l must be \(B, 4, 8\) at prog_si=1"):
        var(expected["labels"], x)  # the full input under prog_si 1
    with pytest.raises(ValueError, match="mask_l"):
        var(expected["labels"], x[:, :4], mask_l=5)
    for bad in (4, -2, 1.0, True):
        var.prog_si = bad
        with pytest.raises(ValueError, match="prog_si"):
            var(expected["labels"], x)
    vae.quantize.prog_si = 9
    with pytest.raises(ValueError, match="prog_si"):
        vae.quantize.idxBl_to_var_input(expected["idx_Bl"])


def test_first_scale_only_gives_word_embed_a_zero_gradient(golden):
    """At prog_si 0 the official forward adds 0 * word_embed's first weight and bias to one logit, so word_embed
    gets zero gradients instead of none (and AdamW still decays it)."""
    vae, var, expected = golden
    var.prog_si = 0
    var(expected["labels"], torch.zeros(2, 0, 8)).sum().backward()
    assert var.word_embed.weight.grad is not None and var.word_embed.bias.grad is not None
    assert not var.word_embed.weight.grad.any() and not var.word_embed.bias.grad.any()
    assert var.head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- schedule
def test_prog_schedule_matches_official():
    assert [prog_si_at(it, 20, 3.0, 0.8, 1, 4) for it in range(20)] == OFFICIAL_PROG_SI
    assert [prog_si_at(it, 20, 3, 0.0, 1, 4) for it in range(20)] == [-1] * 20
    # Python's round (ties to even), as official: progress * delta = 0.5 and 2.5 stay at 0 and 2
    assert prog_si_at(5, 20, 0, 0.5, 0, 2) == 0 and prog_si_at(5, 20, 0, 0.5, 0, 6) == 2


def test_lr_schedule_of_progressive_training_matches_official():
    assert progressive_schedule(0.8) == "lin0.8" and progressive_schedule(0.25) == "lin0.25"
    lrs = [1e-3 * lr_factor(it, 20, 3, wp0=0.005, wpe=0.01, schedule="lin0.8") for it in range(20)]
    assert lrs == pytest.approx(OFFICIAL_LR, rel=1e-12, abs=0)
    assert TrainConfig(max_iters=10, pg=0.8).schedule == "lin0.8"
    assert TrainConfig(max_iters=10).schedule == "lin0"
    with pytest.warns(UserWarning, match="lin0.8"):
        assert TrainConfig(max_iters=10, pg=0.8, schedule="cos").schedule == "cos"
    for bad in ("lin1.5", "lin-0.2", "linx", "exp"):
        with pytest.raises(ValueError, match="schedule"):
            lr_factor(0, 10, 1, schedule=bad)


def test_prog_warmup():
    assert [prog_warmup(i, 2.0, False) for i in (1, 2, 3)] == [0.5, 1.0, 1.0]
    assert prog_warmup(1, 1000.0, False) == 0.01 and prog_warmup(1, 1000.0, True) == 1.0


# ---------------------------------------------------------------------------------------------- trainer
def _official_config(**kw):
    return TrainConfig(max_iters=20, lr=1e-3, weight_decay=0.05, warmup_iters=3, wp0=0.005, wpe=0.01, pg=0.8,
                       pg0=1, pgwp=2.0, **kw)


def test_progressive_training_matches_official(golden):
    vae, var, expected = golden
    trainer = VARTrainer(vae, var, _official_config())
    lengths = []
    var.register_forward_hook(lambda m, i, out: lengths.append(out.shape[1]))
    torch.manual_seed(0)
    history = [trainer.train_step(expected["labels"], img_B3HW=expected["img"]) for _ in range(20)]
    assert lengths == OFFICIAL_LOGITS_L
    # the official trainer reports the last stage as -1 (all scales)
    assert [m["prog_si"] for m in history] == [p if p < 3 else -1 for p in OFFICIAL_PROG_SI]
    assert [m["prog_wp"] for m in history] == OFFICIAL_PROG_WP
    assert [m["lr"] for m in history] == pytest.approx(OFFICIAL_LR, rel=1e-12)
    assert [m["loss"] for m in history] == pytest.approx(OFFICIAL_LOSS, rel=2e-6, abs=1e-6)
    assert [m["grad_norm"] for m in history] == pytest.approx(OFFICIAL_GRAD_NORM, rel=2e-6, abs=1e-6)
    assert var.head.bias.sum().item() == pytest.approx(OFFICIAL_FINAL_HEAD_BIAS_SUM, abs=1e-5)
    assert [m["acc_tail"] for m in history[:13]] == [-1.0] * 13 and history[-1]["acc_tail"] >= 0
    assert var.prog_si == -1 and vae.quantize.prog_si == -1  # reset after every step


def test_progressive_loss_weights(golden):
    """Weights 1/L of the full schedule cut to the trained tokens, the newest scale's scaled by prog_wp."""
    vae, var, expected = golden
    trainer = VARTrainer(vae, var, _official_config())
    w = trainer._prog_weights(2, 0.5)
    assert w.shape == (1, 14)
    torch.testing.assert_close(w[0, :5], torch.full((5,), 1 / 30))
    torch.testing.assert_close(w[0, 5:], torch.full((9,), 0.5 / 30))
    assert trainer._prog_weights(-1, 0.5) is trainer.token_weight_1L


def test_first_scale_only_trains_from_tokens(golden):
    """pg0 = 0 (the official trainer fails there: its idxBl_to_var_input returns None) trains the first scale."""
    vae, var, expected = golden
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=4, pg=0.5, pg0=0, warmup_iters=1))
    metrics = trainer.train_step(expected["labels"], idx_Bl=expected["idx_Bl"])
    assert metrics["prog_si"] == 0 and metrics["acc_tail"] == -1.0
    metrics = trainer.train_step(expected["labels"], idx_Bl=expected["idx_Bl"], prog_si=2)
    assert metrics["prog_si"] == 2 and metrics["prog_wp"] == 1.0  # pgwp = 4 / 300 steps: ramped at once
    assert trainer.first_prog is False


def test_progressive_state_is_checkpointed(golden, tmp_path):
    vae, var, expected = golden
    trainer = VARTrainer(vae, var, _official_config())
    for _ in range(8):
        trainer.train_step(expected["labels"], img_B3HW=expected["img"])
    trainer.save_checkpoint(tmp_path / "ckpt.pth")
    resumed = VARTrainer(vae, var, _official_config())
    resumed.load_checkpoint(tmp_path / "ckpt.pth")
    assert (resumed.prog_it, resumed.last_prog_si, resumed.first_prog) == (1, 2, False)  # step 7 opened stage 2
    assert resumed.train_step(expected["labels"], img_B3HW=expected["img"])["prog_wp"] == 1.0


def test_progressive_config_checks(golden):
    vae, var, _ = golden
    for kw in (dict(pg=1.0), dict(pg=-0.1), dict(pg0=-1), dict(pg0=1.5), dict(pgwp=0), dict(pg=True)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            TrainConfig(max_iters=10, **kw)
    assert TrainConfig(max_iters=600, pg=0.5).pgwp == 2.0  # the official default: ep / 300 epochs
    with pytest.raises(ValueError, match="pg0 must be <= 3"):
        VARTrainer(vae, var, TrainConfig(max_iters=10, pg=0.5, pg0=4))
    with pytest.raises(ValueError, match="DrafterTrainer"):
        DrafterTrainer(vae, var, TrainConfig(max_iters=10, pg=0.5, pg0=1), draft_steps=2)
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=10))
    with pytest.raises(ValueError, match="prog_si"):
        trainer.train_step(torch.tensor([0, 1]), idx_Bl=[torch.zeros(2, pn * pn, dtype=torch.long) for pn in PNS],
                           prog_si=4)


# ---------------------------------------------------------------------------------------------- command line
def _cli_files(tmp_path):
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    g = torch.Generator().manual_seed(1)
    idx_BL = torch.randint(0, 64, (4, sum(pn * pn for pn in PNS)), generator=g)
    torch.save({"idx_BL": idx_BL, "labels": torch.arange(4) % 4}, tmp_path / "tok.pt")
    return ["--vae", str(tmp_path / "vae.pth"), "--tokens", str(tmp_path / "tok.pt"), "--pn", "1_2_3_4",
            "--depth", "2", "--width", "64", "--heads", "2", "--num-classes", "4", "--bs", "2", "--workers", "0",
            "--out", str(tmp_path / "run"), "--no-progress", "--no-resume"]


def test_cli_progressive_training(tmp_path):
    from varcore.train.var_trainer import main

    history = main(_cli_files(tmp_path) + ["--iters", "10", "--wp", "2", "--pg", "0.6", "--pg0", "1", "--pgwp", "2"])
    # stages 1 (to the end of the warm-up; it 3 rounds 0.5 down), 2, then 3 = all scales (reported as -1)
    assert [m["prog_si"] for m in history] == [1, 1, 1, 1, 2, -1, -1, -1, -1, -1]
    ckpt = torch.load(tmp_path / "run" / "ckpt-last.pth", weights_only=True)
    assert ckpt["trainer"]["config"]["schedule"] == "lin0.6" and ckpt["trainer"]["config"]["last_prog_si"] == 3


@pytest.mark.parametrize("extra, match", [(["--pg", "1.5"], "pg must be"), (["--pg", "0.5", "--pg0", "7"], "pg0")])
def test_cli_progressive_mistakes_are_messages(tmp_path, extra, match):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "varcore.train.var_trainer", *_cli_files(tmp_path), "--iters", "2",
                           *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and match in proc.stderr and "Traceback" not in proc.stderr
