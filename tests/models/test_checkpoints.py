"""Safe checkpoint loading, architecture inference, layouts, mismatch reports and the model zoo."""
import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import varcore
from varcore import checkpoints as ck
from varcore.models import PATCH_NUMS, VAR, VAR_CONFIGS, VARConfig, VQVAE


@pytest.fixture(scope="module")
def golden_var_small(golden_dir):
    folder = golden_dir / "var-small"
    return folder, json.loads((folder / "config.json").read_text())["config"]


def tiny_pair(patch_nums=(1, 2, 3), depth=2):
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=patch_nums)
    var = VAR(vae, num_classes=3, depth=depth, embed_dim=64, num_heads=2, attn_l2_norm=True, patch_nums=patch_nums)
    return vae, var


def test_load_golden_files_and_infer_architecture(golden_var_small):
    folder, cfg = golden_var_small
    vae = ck.load_vae(folder / "vae.pth", v_patch_nums=tuple(cfg["patch_nums"]))
    var = ck.load_var(folder / "var.pth", vae)
    assert (vae.vocab_size, vae.Cvae, vae.ch_mult) == (cfg["V"], cfg["Cvae"], (1, 1, 2, 2, 4))
    assert (var.depth, var.C, var.num_heads, var.num_classes, var.patch_nums) == \
        (cfg["depth"], cfg["width"], cfg["heads"], cfg["num_classes"], tuple(cfg["patch_nums"]))
    assert not var.training and not vae.training and not any(p.requires_grad for p in vae.parameters())
    expected = torch.load(folder / "expected.pt", weights_only=True)
    torch.testing.assert_close(var(expected["labels"], expected["var_input_BLCv"]), expected["logits_BLV"],
                               atol=1e-5, rtol=0)
    assert ck.read_state_dict(folder / "var.pth").keys() == var.state_dict().keys()


def test_layouts_are_unwrapped(tmp_path):
    vae, var = tiny_pair()
    sd = var.state_dict()
    layouts = {
        "flat.pth": sd,
        "trainer.pth": {"epoch": 3, "iter": 10, "trainer": {"var_wo_ddp": sd, "vae_local": vae.state_dict()},
                        "args": {}},
        "model.pth": {"model": sd},
        "state.pth": {"state_dict": {k: v for k, v in sd.items()}, "epoch": 1},
        "ddp.pth": {f"module.{k}": v for k, v in sd.items()},
        "compiled.pth": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        var2 = ck.load_var(tmp_path / name, vae)
        assert all(torch.equal(a, b) for a, b in zip(var.state_dict().values(), var2.state_dict().values())), name
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "var.safetensors")
    assert torch.equal(ck.load_var(tmp_path / "var.safetensors", vae).pos_1LC, var.pos_1LC)
    vae2 = ck.load_vae(tmp_path / "trainer.pth", v_patch_nums=(1, 2, 3))
    assert torch.equal(vae2.quantize.embedding.weight, vae.quantize.embedding.weight)


def test_trainer_checkpoint_of_varcore_loads(tmp_path):
    from varcore.train import TrainConfig, VARTrainer
    vae, var = tiny_pair()
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=1))
    trainer.save_checkpoint(tmp_path / "ckpt.pth")
    assert torch.equal(ck.load_var(tmp_path / "ckpt.pth", vae).head.weight, var.head.weight)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    vae, var = tiny_pair()
    sd = dict(var.state_dict())
    del sd["head.bias"]
    sd["blocks.0.extra"] = torch.zeros(1)
    sd["word_embed.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        ck.load_state_dict_checked(var, sd, "VAR")
    msg = str(err.value)
    assert "missing keys: ['head.bias']" in msg and "unexpected keys: ['blocks.0.extra']" in msg
    assert "word_embed.bias: checkpoint (7,) vs model (64,)" in msg
    # a depth mismatch is reported through the same path
    _, deeper = tiny_pair(depth=3)
    with pytest.raises(ValueError, match="missing keys: .*blocks.2"):
        ck.load_state_dict_checked(deeper, var.state_dict(), "VAR")


def test_schedule_mismatch_with_vae_is_explained(tmp_path):
    vae, var = tiny_pair()
    torch.save(var.state_dict(), tmp_path / "var.pth")
    other_vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 3))
    with pytest.raises(ValueError, match="v_patch_nums"):
        ck.load_var(tmp_path / "var.pth", other_vae)
    with pytest.raises(TypeError, match="vae"):
        ck.load_var(tmp_path / "var.pth", None)


def test_unsafe_or_bad_files_are_refused(tmp_path):
    torch.save({"x": types.SimpleNamespace(a=1)}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="weights_only"):
        ck.read_state_dict(tmp_path / "pickle.pth")
    torch.save({"a": 1}, tmp_path / "notsd.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        ck.read_state_dict(tmp_path / "notsd.pth")
    with pytest.raises(FileNotFoundError):
        ck.read_state_dict(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="kind"):
        ck.read_state_dict({}, kind="gpt")
    with pytest.raises(ValueError, match="var_wo_ddp"):
        ck.read_state_dict({"trainer": {"vae_local": {}}}, kind="var")
    with pytest.raises(ValueError, match="not a VAR state dict"):
        ck.infer_var_kwargs({})
    with pytest.raises(ValueError, match="not a VQVAE state dict"):
        ck.infer_vae_kwargs({})


def test_infer_vae_sharing_variants():
    for kwargs in (dict(share_quant_resi=0), dict(share_quant_resi=1), dict(share_quant_resi=3),
                   dict(quant_resi=0.0)):
        vae = VQVAE(vocab_size=8, z_channels=4, ch=32, ch_mult=(1, 2, 2), v_patch_nums=(1, 2, 4), **kwargs)
        inferred = ck.infer_vae_kwargs(vae.state_dict())
        rebuilt = VQVAE(v_patch_nums=(1, 2, 4), **inferred)
        assert rebuilt.state_dict().keys() == vae.state_dict().keys()
        assert all(a.shape == b.shape for a, b in zip(rebuilt.state_dict().values(), vae.state_dict().values()))


def test_infer_var_for_released_architectures():
    for name, config in VAR_CONFIGS.items():
        _, var = config.build(torch.device("meta"))
        kw = ck.infer_var_kwargs(var.state_dict())
        assert (kw["depth"], kw["embed_dim"], kw["num_heads"], kw["shared_aln"], kw["patch_nums"]) == \
            (config.depth, 64 * config.depth, config.depth, config.shared_aln, config.patch_nums), name
        # meta tensors hold no level values: the schedule comes from the number of positions instead
        assert ck.infer_var_kwargs({k: v for k, v in var.state_dict().items() if k != "lvl_1L"}) == kw


# ---------------------------------------------------------------- zoo
@pytest.fixture
def zoo_dir(tmp_path, monkeypatch):
    """A zoo folder with a tiny VAE and a tiny 'd16' (the d16 config is patched to the tiny depth)."""
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=PATCH_NUMS[256])
    var = VAR(vae, num_classes=3, depth=2, embed_dim=64, num_heads=2, attn_l2_norm=True, patch_nums=PATCH_NUMS[256])
    torch.save(vae.state_dict(), tmp_path / ck.ZOO_FILES["vae"])
    torch.save(var.state_dict(), tmp_path / ck.ZOO_FILES["var-d16"])
    monkeypatch.delenv("VARCORE_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # behave as if it is not installed
    return tmp_path, vae, var


def test_from_pretrained_local(zoo_dir, monkeypatch):
    root, vae, var = zoo_dir
    with pytest.raises(ValueError, match="does not hold the var-d16 architecture"):
        ck.from_pretrained("var-d16", root=root)
    monkeypatch.setitem(VAR_CONFIGS, "d16", VARConfig(depth=2, resolution=256))
    vae2, var2 = ck.from_pretrained("var-d16", root=root)
    assert torch.equal(var2.pos_1LC, var.pos_1LC) and var2.vae_proxy[0] is vae2
    monkeypatch.setenv("VARCORE_HOME", str(root))
    assert torch.equal(varcore.from_pretrained("vae").quantize.embedding.weight, vae.quantize.embedding.weight)
    img = var2.autoregressive_infer_cfg(1, 0, g_seed=0)
    assert img.shape == (1, 3, 16 * vae2.downsample, 16 * vae2.downsample)


def test_from_pretrained_missing_file_explains_where(zoo_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ck.from_pretrained("var-d20", root=tmp_path)
    msg = str(err.value)
    assert "var_d20.pth" in msg and str(tmp_path) in msg and "huggingface.co/FoundationVision/var" in msg
    with pytest.raises(FileNotFoundError, match="VARCORE_HOME"):
        ck.zoo_path("var-d24")
    with pytest.raises(ValueError, match="name"):
        ck.from_pretrained("var-d99")


def test_from_pretrained_downloads_through_hub(zoo_dir, tmp_path, monkeypatch):
    root, _, _ = zoo_dir
    calls = []

    def fake_download(repo_id, filename, local_dir=None):
        calls.append((repo_id, filename, local_dir))
        if filename == "var_d30.pth":
            raise ConnectionError("offline")
        return str(root / filename)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ck.zoo_path("vae", root=empty) == root / ck.ZOO_FILES["vae"]
    assert calls == [(ck.HF_REPO, ck.ZOO_FILES["vae"], str(empty))]
    with pytest.raises(FileNotFoundError, match="ConnectionError: offline"):
        ck.zoo_path("var-d30")
