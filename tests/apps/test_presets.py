"""The official FID protocols (varcore.presets) and how sample_ddp applies them."""
import numpy as np
import pytest

from varcore import presets, sample_ddp
from varcore.__main__ import main as varcore_main

# Facts recorded from the upstream repositories (docs/presets.md cites the lines):
# FoundationVision/VAR README: "autoregressive_infer_cfg(..., cfg=1.5, top_p=0.96, top_k=900, more_smooth=False)",
# 50,000 images (50 per class); model zoo: d16/d20/d24/d30 at 256 px, d36 at 512 px; reference batches
# VIRTUAL_imagenet256_labeled.npz / VIRTUAL_imagenet512.npz.
VAR_FACTS = {16: 256, 20: 256, 24: 256, 30: 256, 36: 512}
# czg1225/CoDe sample_CoDe.py: newk = [600]*10; temp = [1.1]*7+[1.0]*3; cfg=1.5; top_p=0.96; more_smooth=False;
# 50 images per class (j in range(50)); released pairs drafter_N/refiner_N for N = 6..9.
CODE_FACTS = dict(top_k=600, temperature=[1.1] * 7 + [1.0] * 3, cfg=1.5, top_p=0.96, per_class=50)
# FoundationVision/LlamaGen GETTING_STARTED.md, sample_c2i.sh commands: --image-size 384 --image-size-eval 256 and
# --cfg-scale 2.0 (GPT-B, c2i_B.pt), 2.0 (GPT-L), 1.75 (GPT-XL), 1.75 (GPT-XXL), 1.65 (GPT-3B); README model zoo:
# c2i_{B,L,XL,XXL,3B}_384.pt (24x24 tokens). sample_c2i_ddp.py defaults: --top-k 0, --top-p 1.0, --temperature 1.0,
# --num-fid-samples 50000; evaluated against VIRTUAL_imagenet256_labeled.npz.
LLAMAGEN_FACTS = {"b": 2.0, "l": 2.0, "xl": 1.75, "xxl": 1.75, "3b": 1.65}
# YuqingWang1029/PAR README.md, sample_c2i.sh commands: --image-size 384 --image-size-eval 256 and --cfg-scale
# 1.345 (PAR-3B-4x), 1.435 (GPT-XXL, 4x), 1.5 (PAR-XL-4x), 1.5 (PAR-3B-16x); the same sampler defaults.
PAR_FACTS = {"xl-4x": 1.5, "xxl-4x": 1.435, "3b-4x": 1.345, "3b-16x": 1.5}


def test_the_presets_are_exactly_the_official_protocols():
    assert set(presets.PRESETS) == ({f"var-d{d}" for d in VAR_FACTS} | {f"code-{n}" for n in (6, 7, 8, 9)}
                                    | {f"llamagen-{s}" for s in LLAMAGEN_FACTS} | {f"par-{m}" for m in PAR_FACTS})


@pytest.mark.parametrize("name,cfg", [*[(f"llamagen-{s}", c) for s, c in LLAMAGEN_FACTS.items()],
                                      *[(f"par-{m}", c) for m, c in PAR_FACTS.items()]])
def test_gpt_presets(name, cfg):
    p = presets.get_preset(name)
    assert (p.model, p.per_class, p.cfg, p.top_k, p.top_p, p.temperature) == (name, 50, cfg, 0, 1.0, 1.0)
    assert (p.sample_size, p.image_size, p.reference) == (384, 256, "VIRTUAL_imagenet256_labeled.npz")
    repo = "FoundationVision/LlamaGen" if name.startswith("llamagen") else "YuqingWang1029/PAR"
    assert all(repo in s for s in p.sources)
    from varcore.checkpoints import GPT_ZOO  # the preset's model is a zoo name of the released 384 px file

    file = GPT_ZOO[p.model][0]
    assert file in p.notes and file.endswith(".pt") and ("_384" in file or file.startswith("PAR-"))


@pytest.mark.parametrize("depth", sorted(VAR_FACTS))
def test_var_presets(depth):
    p = presets.get_preset(f"var-d{depth}")
    assert (p.model, p.per_class, p.cfg, p.top_k, p.top_p, p.more_smooth, p.temperature) == \
        (f"var-d{depth}", 50, 1.5, 900, 0.96, False, 1.0)
    assert p.image_size == p.sample_size == VAR_FACTS[depth]
    assert p.reference == ("VIRTUAL_imagenet256_labeled.npz" if depth < 36 else "VIRTUAL_imagenet512.npz")
    assert any("FoundationVision/VAR" in s for s in p.sources)


@pytest.mark.parametrize("n", [6, 7, 8, 9])
def test_code_presets(n):
    p = presets.get_preset(f"code-{n}")
    assert p.model == f"code-{n}" and p.image_size == 256 and p.more_smooth is False
    assert (p.top_k, list(p.temperature), p.cfg, p.top_p, p.per_class) == tuple(CODE_FACTS.values())
    assert any("czg1225/CoDe sample_CoDe.py" in s for s in p.sources)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get_preset("var-d99")


def test_model_defaults_fit_the_vocabulary():
    assert presets.model_defaults("var", None, 4096)["top_k"] == 900
    assert presets.model_defaults("code", None, 512)["top_k"] == 512
    d = presets.model_defaults("var", 2.0, 512)
    assert (d["cfg"], d["top_k"], d["top_p"]) == (2.0, 0, 0.0)  # VAR's top_p 0: off
    # a GPT: LlamaGen's sample_c2i_ddp.py defaults (--cfg-scale 1.5, --top-k 0, --top-p 1.0)
    d = presets.model_defaults("gpt", None, 16384)
    assert (d["cfg"], d["top_k"], d["top_p"], d["temperature"]) == (1.5, 0, 1.0, 1.0)
    assert presets.model_defaults("gpt", 2.0, 256)["top_p"] == 1.0  # LlamaGen's top_p 1: off
    with pytest.raises(ValueError, match="family must be one of"):
        presets.model_defaults("dit", None, 10)


def test_adm_command():
    cmd = presets.adm_evaluator_command("runs/fid/samples.npz", 512)
    assert "imagenet/512/VIRTUAL_imagenet512.npz" in cmd and cmd.endswith("VIRTUAL_imagenet512.npz "
                                                                             "runs/fid/samples.npz")
    assert "evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz" in presets.adm_evaluator_command("s.npz", 256)
    assert presets.adm_evaluator_command("s.npz", 16) is None


def _captured_main(monkeypatch, tmp_path, argv, size=256):
    """sample_ddp.main with run() replaced: the resolved arguments, and a fake samples.npz of ``size`` px."""
    seen = {}

    def fake_run(args):
        seen["args"] = args
        out = tmp_path / "samples.npz"
        np.savez(out, arr_0=np.zeros((1, size, size, 3), np.uint8), labels=np.zeros(1, np.int64))
        return out

    monkeypatch.setattr(sample_ddp, "run", fake_run)
    sample_ddp.main(argv)
    return seen["args"]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_sample_ddp_applies_every_preset(monkeypatch, tmp_path, capsys, name):
    p = presets.get_preset(name)
    args = _captured_main(monkeypatch, tmp_path, ["--preset", name, "--root", str(tmp_path), "--out",
                                                  str(tmp_path)], size=p.image_size)
    assert (args.model, args.per_class, args.cfg, args.top_k, args.top_p, args.more_smooth) == \
        (p.model, p.per_class, p.cfg, p.top_k, p.top_p, p.more_smooth)
    assert args.temperature == (list(p.temperature) if isinstance(p.temperature, tuple) else p.temperature)
    assert args.classes == list(range(1000))
    assert args.image_size == (None if p.image_size == p.sample_size else p.image_size)
    err = capsys.readouterr().err
    assert f"evaluator.py {p.reference} {tmp_path / 'samples.npz'}" in err


def test_flags_win_over_the_preset(monkeypatch, tmp_path):
    args = _captured_main(monkeypatch, tmp_path, ["--preset", "code-8", "--cfg", "2.5", "--per-class", "3",
                                                  "--temperature", "1.0", "--out", str(tmp_path)])
    assert (args.cfg, args.per_class, args.temperature, args.top_k) == (2.5, 3, 1.0, 600)


@pytest.mark.parametrize("argv,match", [
    (["--out", "x"], "--model and --per-class are required"),
    (["--preset", "nope", "--out", "x"], "preset must be one of"),
    (["--preset", "code-8", "--temperature", "1.1,a", "--out", "x"], "--temperature"),
    (["--preset", "code-8", "--temperature", "1.1,0", "--out", "x"], "--temperature: '0': a number > 0"),
])
def test_bad_preset_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        sample_ddp.main(argv)
    assert match in capsys.readouterr().err


def test_varcore_presets_lists_every_preset_with_sources(capsys):
    assert varcore_main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in presets.PRESETS)
    assert "sample_CoDe.py" in out and "FoundationVision/VAR README.md" in out
    assert "FoundationVision/LlamaGen GETTING_STARTED.md" in out and "YuqingWang1029/PAR README.md" in out
    assert "384 -> 256 px" in out
