"""The ``varcore`` command line: sample, eval, bench, train-digits and --help."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from varcore.__main__ import main
from varcore.cli import bench
from varcore.cli.sample import make_grid
from varcore.digits import DigitsSampler


@pytest.mark.parametrize("argv", [[], ["info"], ["sample"], ["eval"], ["bench"], ["train-digits"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: varcore" in capsys.readouterr().out


def test_sample_png_and_npz(tmp_path, capsys):
    png, npz = tmp_path / "g.png", tmp_path / "g.npz"
    argv = ["sample", "--model", "digits-var", "--classes", "1", "7", "2", "--seeds", "0", "5", "--cfg", "1.5",
            "--top-k", "100", "--top-p", "0.95", "--out", str(png), "--npz", str(npz), "--scale", "2",
            "--no-progress"]
    assert main(argv) == 0
    assert "6 images" in capsys.readouterr().out
    # grid: 2 rows x 3 columns of 32 px cells with 1 px borders
    grid = np.asarray(Image.open(png))
    assert grid.shape == (2 * 33 + 1, 3 * 33 + 1, 3)
    data = np.load(npz)
    assert data["arr_0"].shape == (6, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [1, 7, 2, 1, 7, 2]
    # the images are the sampler's: row of seed 5 is one call with seed 5
    want = DigitsSampler("digits-var").sample([1, 7, 2], seed=5, cfg=1.5, top_k=100, top_p=0.95)
    want = want.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(data["arr_0"][3:], want)
    assert np.array_equal(grid[34:66:2, 1:33:2], want[0])  # cell (1, 0), every other pixel of the 2x upscale
    # same command, same bytes
    assert main(argv[:-7] + ["--out", str(tmp_path / "h.png"), "--scale", "2", "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "h.png")), grid)


@pytest.mark.parametrize("model, accel, call", [
    ("digits-var8", "prune=-1:0.5,cfg_skip=1,draw=inverse_cdf", dict(prune={5: 0.5}, cfg_skip=1, draw="inverse_cdf")),
    ("digits-code8", "draft_steps=3", dict(draft_steps=3)),
    ("digits-raster", "sjd=4", dict(sjd=4)),
])
def test_sample_accel_reaches_the_sampler(model, accel, call, tmp_path, capsys):
    out = tmp_path / "a.npz"
    assert main(["sample", "--model", model, "--classes", "3", "8", "--seeds", "2", "--accel", accel,
                 "--out", str(tmp_path / "a.png"), "--npz", str(out), "--no-progress"]) == 0
    want = DigitsSampler(model).sample([3, 8], seed=2, **call)
    want = want.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(out)["arr_0"], want)
    if model == "digits-code8":
        assert "CoDe N=3" in capsys.readouterr().out


def test_sample_batch_size_splits_rows(tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", "digits-par", "--classes", "0", "1", "2", "--seeds", "3", "--batch-size", "2",
                 "--out", str(tmp_path / "s.png"), "--npz", str(out), "--no-progress"]) == 0
    arr = np.load(out)["arr_0"]
    sampler = DigitsSampler("digits-par")
    first = sampler.sample([0, 1], seed=3).mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    second = sampler.sample([2], seed=3 + 1000003).mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(arr[:2], first) and np.array_equal(arr[2:], second.numpy())


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--classes", "10"], "--classes"),
    (["--batch-size", "0"], "--batch-size"),
    (["--var", "x.pth"], "--vae"),
    (["--gpt", "x.pt"], "--vq"),
    (["--var", "/nonexistent/var.pth", "--vae", "/nonexistent/vae.pth"], "var.pth"),
    (["--accel", "sjd=4"], "--accel: 'sjd' is not an option of a var model"),
    (["--accel", "prune=9:0.5"], "scale index in [0, 3]"),
    (["--model", "digits-code", "--accel", "draft_steps=9"], "draft_steps must be in [1, 3]"),
])
def test_sample_errors_are_one_line(args, message, tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path / "x.png"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("varcore sample: error:") and message in err


def test_make_grid_layout():
    imgs = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    g = make_grid(imgs, rows=2, cols=3, scale=1, pad=1)
    assert g.shape == (7, 10, 3)
    assert np.array_equal(g[4:6, 7:9], imgs[5]) and (g[0] == 0).all()
    with pytest.raises(ValueError, match="rows"):
        make_grid(imgs, rows=2, cols=2)


def test_eval_json_keys_and_ranges():
    out = subprocess.run([sys.executable, "-m", "varcore", "eval", "--json", "--models", "digits-var-small",
                          "digits-par", "--per-class", "3", "--batch-size", "15", "--no-progress"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["model"] for r in rows] == ["digits-var-small", "digits-par"]
    for r in rows:
        assert list(r) == ["model", "decoding", "steps", "images_per_s", "class_consistency", "frechet"]
        assert 0.0 <= r["class_consistency"] <= 1.0 and r["images_per_s"] > 0 and r["frechet"] >= 0
    # 16x16 codes, 2x2 regions: the class token, 3 more region starts, then 63 groups of 4
    assert rows[0]["steps"] == 4 and rows[1]["steps"] == 1 + 3 + 63 and rows[1]["decoding"] == "PAR-4x"


def test_sample_and_eval_the_8x8_latent_family(tmp_path, capsys):
    out = tmp_path / "c.npz"
    assert main(["sample", "--model", "digits-code8", "--classes", "4", "9", "--seeds", "2", "--out",
                 str(tmp_path / "c.png"), "--npz", str(out), "--no-progress"]) == 0
    want = DigitsSampler("digits-code8").sample([4, 9], seed=2)
    want = want.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(out)["arr_0"], want)
    capsys.readouterr()
    assert main(["eval", "--json", "--models", "digits-var8", "digits-var8-small", "digits-code8", "--per-class",
                 "1", "--batch-size", "10", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["digits-var8", "digits-var8-small", "digits-code8"]
    assert [r["steps"] for r in rows] == [6, 6, 6] and rows[2]["decoding"].startswith("CoDe N=")


def test_eval_table(capsys):
    assert main(["eval", "--models", "digits-var", "--per-class", "2", "--batch-size", "10", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "class consistency" in text and "digits-var" in text and "real test digits" in text


def test_bench_lists_and_runs_from_checkout(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "par_order" in listed and "sampler" in listed
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_bench_without_checkout_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: None)
    assert main(["bench"]) == 2
    assert "source repository" in capsys.readouterr().err


def test_train_digits_cli_tiny(tmp_path, capsys):
    assert main(["train-digits", "--tiny", "--parts", "classifier", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "classifier.safetensors").is_file()
    assert "classifier:" in capsys.readouterr().out


def test_train_digits_cli_writes_to_the_working_directory_by_default(tmp_path, monkeypatch, capsys):
    from varcore.digits.recipe import WEIGHTS_DIR

    bundled = {f: f.stat().st_mtime_ns for f in WEIGHTS_DIR.glob("*.safetensors")}
    monkeypatch.chdir(tmp_path)
    assert main(["train-digits", "--tiny", "--parts", "classifier", "--no-progress"]) == 0
    assert (tmp_path / "digits-weights" / "classifier.safetensors").is_file()
    assert {f: f.stat().st_mtime_ns for f in WEIGHTS_DIR.glob("*.safetensors")} == bundled
    assert main(["train-digits", "--tiny", "--out", "x", "--into-package"]) == 2  # a usage error: one line
    assert "not allowed with argument" in capsys.readouterr().err
