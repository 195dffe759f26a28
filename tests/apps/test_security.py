"""No loader runs code from a file: a malicious pickle is refused by every loader, and the payload never runs."""
import ast
import builtins
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from varcore import checkpoints, sample_ddp
from varcore.models import VAR, VQVAE
from varcore.models.gpt import ModelArgs, Transformer
from varcore.train.data import TokenPyramids
from varcore.train.gpt_trainer import GPTTrainer
from varcore.train.var_trainer import TrainConfig, VARTrainer

PACKAGE = Path(__file__).resolve().parents[2] / "varcore"


class _Payload:
    """Unpickling this calls ``builtins.exec`` on code that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _malicious_files(tmp_path: Path) -> dict:
    """The payload in each container a loader might meet: bare pickle, torch zip, nested in a state dict / trainer
    checkpoint (next to real tensors), and renamed to .safetensors."""
    marker = tmp_path / "PWNED"
    evil = _Payload(marker)
    files = {}
    files["bare.pth"] = tmp_path / "bare.pth"
    with open(files["bare.pth"], "wb") as f:
        pickle.dump(evil, f)
    files["torch.pth"] = tmp_path / "torch.pth"
    torch.save(evil, files["torch.pth"])
    files["state_dict.pth"] = tmp_path / "state_dict.pth"
    torch.save({"model": {"pos_start": torch.zeros(1, 1, 8), "evil": evil}}, files["state_dict.pth"])
    files["trainer.pth"] = tmp_path / "trainer.pth"
    torch.save({"iter": 1, "trainer": {"var_wo_ddp": {"x": torch.zeros(1)}, "evil": evil}, "steps": 1,
                "model": {}, "optimizer": evil}, files["trainer.pth"])
    files["fake.safetensors"] = tmp_path / "fake.safetensors"
    files["fake.safetensors"].write_bytes(files["torch.pth"].read_bytes())
    return marker, files


def _tiny_vae():
    return VQVAE(vocab_size=16, z_channels=4, ch=32, share_quant_resi=4, v_patch_nums=(1, 2), ch_mult=(1, 1))


def _loaders(tmp_path):
    """Every function that reads a user-supplied file, as name -> callable(path)."""
    vae = _tiny_vae()
    var = VAR(vae, num_classes=2, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2))
    gpt = Transformer(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=8, num_classes=2, block_size=4))

    def zoo(path):  # the zoo reads <root>/vae_ch160v4096z32.pth
        root = tmp_path / "zoo"
        root.mkdir(exist_ok=True)
        (root / checkpoints.VAE_FILE).write_bytes(Path(path).read_bytes())
        return checkpoints.from_pretrained("vae", root=root)

    def ddp_model(path):
        return sample_ddp.load_sampler(f"{path},{path}", "cpu")

    def digits_weights(path):  # bundled models: <root>/<part>.safetensors
        from varcore.digits.recipe import load_weights

        root = tmp_path / "digits"
        root.mkdir(exist_ok=True)
        (root / "vqvae.safetensors").write_bytes(Path(path).read_bytes())
        return load_weights("vqvae", root=root)

    return {
        "read_state_dict": lambda p: checkpoints.read_state_dict(p),
        "load_code_pair": lambda p: checkpoints.load_code_pair(p, p, vae),
        "digits.load_weights": digits_weights,
        "read_state_dict(vae)": lambda p: checkpoints.read_state_dict(p, kind="vae"),
        "load_vae": lambda p: checkpoints.load_vae(p),
        "load_var": lambda p: checkpoints.load_var(p, vae),
        "from_pretrained": zoo,
        "load_gpt": lambda p: checkpoints.load_gpt(p),
        "load_vq16": lambda p: checkpoints.load_vq16(p),
        "TokenPyramids": lambda p: TokenPyramids(p),
        "VARTrainer.load_checkpoint": lambda p: VARTrainer(vae, var, TrainConfig(max_iters=1)).load_checkpoint(p),
        "GPTTrainer.load_checkpoint": lambda p: GPTTrainer(gpt, TrainConfig(max_iters=1)).load_checkpoint(p),
        "sample_ddp.load_sampler": ddp_model,
    }


LOADER_NAMES = ["read_state_dict", "read_state_dict(vae)", "load_vae", "load_var", "from_pretrained", "load_gpt",
                "load_vq16", "load_code_pair", "digits.load_weights", "TokenPyramids", "VARTrainer.load_checkpoint",
                "GPTTrainer.load_checkpoint", "sample_ddp.load_sampler"]
FILES = ["bare.pth", "torch.pth", "state_dict.pth", "trainer.pth", "fake.safetensors"]


def test_the_payload_is_live(tmp_path):
    """Control: a plain unpickler does run the payload, so the tests below would notice a loader that unpickles."""
    marker, files = _malicious_files(tmp_path)
    torch.load(files["state_dict.pth"], weights_only=False)
    assert marker.read_text() == "pwned"


def test_every_loader_is_listed(tmp_path):
    assert sorted(_loaders(tmp_path)) == sorted(LOADER_NAMES)


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("loader", LOADER_NAMES)
def test_loader_refuses_malicious_pickle(tmp_path, loader, file):
    marker, files = _malicious_files(tmp_path)
    with pytest.raises(Exception) as err:
        _loaders(tmp_path)[loader](files[file])
    assert not marker.exists(), f"{loader} ran code from {file}"
    # refused for what the file is, not for an unrelated reason such as a missing file
    assert not isinstance(err.value, (FileNotFoundError, AttributeError, NameError)), err.value


def test_checkpoint_loader_error_says_why(tmp_path):
    marker, files = _malicious_files(tmp_path)
    with pytest.raises(ValueError, match="weights_only=True"):
        checkpoints.load_vae(files["torch.pth"])
    assert not marker.exists()


def test_shard_with_pickled_objects_is_not_unpickled(tmp_path):
    """sample_ddp reads its own shard files with allow_pickle=False: an object array is redone, never loaded."""
    marker = tmp_path / "PWNED"
    shard = sample_ddp.plan_shards([0], 1, 1)[0]
    path = shard.path(tmp_path)
    path.parent.mkdir(parents=True)
    np.savez(path, images=np.array([_Payload(marker)], dtype=object), labels=shard.labels, indices=shard.indices)
    with pytest.warns(UserWarning, match="unreadable"):
        assert sample_ddp._read_shard(shard, tmp_path, settings="{}", image_hw=(16, 16)) is None
    assert not marker.exists()


def _calls(name: str):
    """(file, call node) for every call of ``*.name(...)`` / ``name(...)`` in the package source."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    yield path.relative_to(PACKAGE.parent), node


def _keyword(node, name):
    return next((kw.value for kw in node.keywords if kw.arg == name), None)


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [(p, n) for p, n in _calls("load") if isinstance(n.func, ast.Attribute)
             and getattr(n.func.value, "id", None) == "torch"]
    assert calls, "found no torch.load calls: the scan is broken"
    for path, node in calls:
        value = _keyword(node, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno} torch.load without " \
                                                                        f"weights_only=True"


def test_no_pickle_and_no_pickled_numpy_in_the_package():
    for path, node in _calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) in ("np", "numpy"):
            value = _keyword(node, "allow_pickle")
            assert value is None or (isinstance(value, ast.Constant) and value.value is False), \
                f"{path}:{node.lineno} np.load with allow_pickle"
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"pickle", "dill", "cloudpickle", "joblib"}, f"{path} imports a pickle module"
