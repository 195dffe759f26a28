"""Shared fixtures: golden data location and device/backend selection."""
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


def load_expected(folder: Path) -> dict:
    return torch.load(folder / "expected.pt", map_location="cpu", weights_only=True)
