"""Files fail early and by name; trainers stop on a non-finite loss and refuse checkpoints that cannot resume; the
command lines answer a user's mistake with one line and exit status 2, never a traceback."""
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from varcore import checkpoints as ck
from varcore.digits import load_bundled, recipe
from varcore.models import VAR, VQVAE

PNS = (1, 2, 3)


def _pair(seed=0):
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    var = VAR(vae, num_classes=3, depth=2, embed_dim=64, num_heads=2, attn_l2_norm=True, patch_nums=PNS)
    return vae, var


# ---------------------------------------------------------------------------------------------- checkpoint files
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_converted_with_a_warning(tmp_path, dtype):
    vae, var = _pair()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in var.state_dict().items()}
    torch.save(state, tmp_path / "var.pth")
    with pytest.warns(UserWarning, match=f"converted .*{str(dtype)}"):
        loaded = ck.load_var(tmp_path / "var.pth", vae)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, state[k].float(), rtol=0, atol=0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_weights_are_refused_by_name(tmp_path, value):
    vae, var = _pair()
    state = var.state_dict()
    state["head.bias"][2] = value
    with pytest.raises(ValueError, match="NaN or inf .*head.bias"):
        ck.load_var(state, vae)
    vstate = vae.state_dict()
    vstate["quantize.embedding.weight"][0, 0] = value
    torch.save(vstate, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        ck.load_vae(tmp_path / "vae.pth", v_patch_nums=PNS)


def test_integer_tensor_of_another_dtype_is_refused():
    vae, var = _pair()
    state = dict(var.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state["head.bias"] = state["head.bias"].to(torch.int32)
    with pytest.raises(ValueError, match="head.bias is torch.int32"):
        ck.load_var(state, vae)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_damaged_files_are_named(tmp_path, damage, suffix):
    vae, var = _pair()
    path = tmp_path / f"var{suffix}"
    if suffix == ".pth":
        torch.save(var.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in var.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 50}[damage])
    want = {"empty": "is empty"}.get(damage, "truncated|not a checkpoint|not a valid safetensors")
    with pytest.raises(ValueError, match=want) as err:
        ck.load_var(path, vae)
    assert str(path) in str(err.value)
    assert "unpickle" not in str(err.value)  # not the pickling hint


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        ck.read_file(tmp_path)


# ---------------------------------------------------------------------------------------------- bundled weights
@pytest.fixture
def weights_copy(tmp_path):
    for p in recipe.WEIGHTS_DIR.glob("*.safetensors"):
        shutil.copy(p, tmp_path)
    return tmp_path


def test_metadata_is_checked_against_the_tensors_before_building(weights_copy, monkeypatch):
    """A 200-byte file whose metadata claims embed_dim=16384 is refused from its header alone: the full model
    is never built (building it would take gigabytes)."""
    arch = {**recipe.ARCHS["var-drafter"], "embed_dim": 16384}
    path = weights_copy / "var-drafter.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"arch": json.dumps(arch), "info": "{}"})
    assert path.stat().st_size < 1000
    built = []
    original = recipe.build
    monkeypatch.setattr(recipe, "build",
                        lambda part, **kw: built.append((part, torch.empty(0).device.type)) or original(part, **kw))
    with pytest.raises(ValueError, match="do not match the architecture"):
        load_bundled("digits-var", weights_root=weights_copy)
    assert ("vqvae", "cpu") in built and [d for p, d in built if p == "var-drafter"] == ["meta"]


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"\x08\x00\x00\x00\x00\x00\x00\x00{bad", "not a valid"),
                                           (None, "not valid JSON")])
def test_damaged_bundled_weights_are_named(weights_copy, content, match):
    path = weights_copy / "var-drafter.safetensors"
    if content is None:
        save_file({"x": torch.zeros(1)}, str(path), metadata={"arch": "{not json", "info": "{}"})
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_bundled("digits-var", weights_root=weights_copy)


# ---------------------------------------------------------------------------------------------- trainers
def test_var_trainer_stops_on_a_nonfinite_loss():
    from varcore.train.var_trainer import TrainConfig, VARTrainer, build_var_for_training

    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    var = build_var_for_training(vae, depth=2, num_classes=3, width=64, heads=2, cond_drop_rate=0.0)
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=4))
    g = torch.Generator().manual_seed(0)
    idx_Bl = [torch.randint(0, 16, (2, pn * pn), generator=g) for pn in PNS]
    trainer.train_step(torch.tensor([0, 1]), idx_Bl=idx_Bl)
    with torch.no_grad():
        var.head.bias[0] = math.nan
    before = {k: v.clone() for k, v in var.state_dict().items()}
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        trainer.train_step(torch.tensor([0, 1]), idx_Bl=idx_Bl)
    after = var.state_dict()
    assert all(torch.equal(before[k], after[k]) or k == "head.bias" for k in before)  # nothing was updated
    assert trainer.it == 1


def test_gpt_trainer_stops_on_a_nonfinite_loss():
    from varcore.models.gpt import ModelArgs, Transformer
    from varcore.train.gpt_trainer import GPTTrainer
    from varcore.train.var_trainer import TrainConfig

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=16, block_size=16, num_classes=4))
    trainer = GPTTrainer(model, TrainConfig(max_iters=3))
    with torch.no_grad():
        model.tok_embeddings.weight[:] = math.inf
    with pytest.raises(FloatingPointError, match="training loss"):
        trainer.train_step(torch.tensor([0, 1]), torch.randint(0, 16, (2, 16)))


def _var_trainer():
    from varcore.train.var_trainer import TrainConfig, VARTrainer, build_var_for_training

    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    return VARTrainer(vae, build_var_for_training(vae, depth=2, num_classes=3, width=64, heads=2),
                      TrainConfig(max_iters=4))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["trainer"].pop("var_opt"), "no var_opt.optimizer state"),
    (lambda c: c["trainer"]["var_opt"].pop("optimizer"), "no var_opt.optimizer state"),
    (lambda c: c["trainer"].pop("var_wo_ddp"), "no var_wo_ddp state"),
    (lambda c: c.update(iter=-3), "iter must be an int >= 0"),
    (lambda c: c.update(iter=2.5), "iter must be an int >= 0"),
])
def test_var_trainer_checkpoint_that_cannot_resume_is_refused(tmp_path, edit, match):
    trainer = _var_trainer()
    trainer.save_checkpoint(tmp_path / "ck.pth")
    ckpt = torch.load(tmp_path / "ck.pth", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "ck.pth")
    with pytest.raises(ValueError, match=match):
        _var_trainer().load_checkpoint(tmp_path / "ck.pth")
    (tmp_path / "ck.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        _var_trainer().load_checkpoint(tmp_path / "ck.pth")


@pytest.mark.parametrize("edit,match", [(lambda c: c.pop("optimizer"), "no optimizer state"),
                                        (lambda c: c.update(steps=-1), "steps must be an int >= 0")])
def test_gpt_trainer_checkpoint_that_cannot_resume_is_refused(tmp_path, edit, match):
    from varcore.models.gpt import ModelArgs, Transformer
    from varcore.train.gpt_trainer import GPTTrainer
    from varcore.train.var_trainer import TrainConfig

    def trainer():
        torch.manual_seed(0)
        return GPTTrainer(Transformer(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=16, block_size=16,
                                                num_classes=4)), TrainConfig(max_iters=3))
    trainer().save_checkpoint(tmp_path / "ck.pt")
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "ck.pt")
    with pytest.raises(ValueError, match=match):
        trainer().load_checkpoint(tmp_path / "ck.pt")


# ---------------------------------------------------------------------------------------------- command lines
def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "afile").write_text("x")
    (root / "bad.safetensors").write_bytes(b"garbage!")
    (root / "empty.pth").write_bytes(b"")
    return root


CASES = [
    ("--device cuda", "no CUDA device is available"), ("--device foo", "not a torch device"),
    ("--device meta", "meta tensors hold no data"), ("--out {root}/afile/x.png", "is a file, not a folder"),
    ("--out {root}/noext", "must end in one of"), ("--cfg inf", "a finite number"), ("--top-p nan", "a finite number"),
    ("--batch-size 0", "argument --batch-size"), ("--seeds -1", "a seed is an int in [0, 2**64)"),
    ("--npz {root}/afile/x.npz", "is a file, not a folder"), ("--npz {root}/x.png", "must end in .npz"),
]


@pytest.mark.parametrize("extra,match", CASES, ids=[c[0].split()[0] + c[0].split()[1][:6] for c in CASES])
def test_varcore_sample_mistakes(files, extra, match):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = _cli("-m", "varcore", "sample", "--model", "digits-var", "--out", str(files / "s.png"),
               *extra.format(root=files).split())
    assert out.returncode == 2, out.stderr
    assert match in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("paths,match", [("--vae {root}/bad.safetensors --var {root}/bad.safetensors",
                                          "bad.safetensors is not a valid safetensors file"),
                                         ("--vae {root}/empty.pth --var {root}/empty.pth", "empty.pth is empty")])
def test_varcore_sample_bad_checkpoint_files(files, paths, match):
    out = _cli("-m", "varcore", "sample", *paths.format(root=files).split(), "--out", str(files / "s.png"))
    assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("extra,match", [
    (["--device", "foo"], "not a torch device"), (["--out-is-file"], "is a file, not a folder"),
    (["--temperature", "0"], "a number > 0"), (["--cfg", "nan"], "a finite number"),
    (["--timeout-min", "0"], "a number > 0"), (["--top-k", "4000"], "top_k must be <= the vocabulary"),
])
def test_sample_ddp_mistakes(files, extra, match):
    """Also the values that only the model can check (top_k above its vocabulary): refused before run.json."""
    out_dir = files / "afile" if extra == ["--out-is-file"] else files / "ddp"
    extra = [] if extra == ["--out-is-file"] else extra
    out = _cli("-m", "varcore.sample_ddp", "--model", "digits-var", "--per-class", "1", "--classes", "0",
               "--out", str(out_dir), "--no-progress", *extra)
    assert out.returncode == 2, out.stderr
    assert match in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("extra,match", [(["--batch-size", "0"], "argument --batch-size"),
                                         (["--seed", "-2"], "a seed is an int"),
                                         (["--out", "{root}/afile"], "is a file, not a folder")])
def test_train_digits_mistakes(files, extra, match):
    """--tiny ignores --batch-size, but a batch of 0 images is refused all the same (it trained silently)."""
    extra = [e.format(root=files) for e in extra]
    args = extra if "--out" in extra else [*extra, "--out", str(files / "td")]
    out = _cli("-m", "varcore", "train-digits", "--tiny", "--parts", "vq", "--no-progress", *args)
    assert out.returncode == 2, out.stderr
    assert match in out.stderr and "Traceback" not in out.stderr


def test_bundled_weights_with_nan_are_refused(weights_copy):
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = weights_copy / "var-drafter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["head.bias"][1] = math.nan
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match="NaN or inf in \\['head.bias'\\]"):
        load_bundled("digits-var", weights_root=weights_copy)
