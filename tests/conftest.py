"""Shared fixtures: golden data location and device/backend selection."""
import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_IN_TREE = Path(__file__).resolve().parent / "golden"


def _golden_root() -> Path:
    """$VARCORE_GOLDEN when set, else the copy that ships with the tests (tests/golden)."""
    env = os.environ.get("VARCORE_GOLDEN")
    return Path(env) if env else GOLDEN_IN_TREE


@pytest.fixture(scope="session")
def golden_dir():
    """Folder with the official golden data; skips outside CI when absent, fails under CI."""
    root = _golden_root()
    if not root.is_dir():
        msg = f"golden data not found at {root} (set VARCORE_GOLDEN or restore tests/golden)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def load_expected(folder: Path, name: str = "expected.pt") -> dict:
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def _state(folder: Path, name: str) -> dict:
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def _golden_vae(folder: Path, c: dict):
    from varcore.models import VQVAE

    vae = VQVAE(vocab_size=c["V"], z_channels=c["Cvae"], ch=c["ch"], share_quant_resi=4,
                v_patch_nums=tuple(c["patch_nums"]))
    vae.load_state_dict(_state(folder, "vae.pth"), strict=True)
    return vae.eval()


def load_var_small(golden_dir: Path):
    """The golden ``var-small`` pair in eval mode, built as the official code builds it: (vae, var, config.json)."""
    from varcore.models import VAR

    folder = golden_dir / "var-small"
    cfg = json.loads((folder / "config.json").read_text())
    c = cfg["config"]
    vae = _golden_vae(folder, c)
    var = VAR(vae, num_classes=c["num_classes"], depth=c["depth"], embed_dim=c["width"], num_heads=c["heads"],
              attn_l2_norm=True, patch_nums=tuple(c["patch_nums"]))
    var.load_state_dict(_state(folder, "var.pth"), strict=True)
    return vae, var.eval(), cfg


def load_code_small(golden_dir: Path):
    """The golden ``code-small`` models in eval mode, built by CoDe's builder: (vae, drafter, refiner, config.json)."""
    from varcore.models import build_vae_var_ctf

    folder = golden_dir / "code-small"
    cfg = json.loads((folder / "config.json").read_text())
    vae, drafter, refiner = build_vae_var_ctf(
        V=cfg["V"], Cvae=cfg["Cvae"], ch=cfg["ch"], share_quant_resi=4, device="cpu",
        patch_nums=tuple(cfg["patch_nums"]), num_classes=cfg["num_classes"], depth_draft=cfg["draft"]["depth"],
        depth_refine=cfg["refine"]["depth"], shared_aln=False)
    for model, name in ((vae, "vae"), (drafter, "drafter"), (refiner, "refiner")):
        model.load_state_dict(_state(folder, f"{name}.pth"), strict=True)
        model.eval()
    return vae, drafter, refiner, cfg
