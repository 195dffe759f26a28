"""The golden data ships with the tests: a fresh clone finds it without any environment."""
import json

import pytest
import torch

import conftest

FILES = {"var-small": ["config.json", "vae.pth", "var.pth", "expected.pt", "expected_autocast.pt"],
         "code-small": ["config.json", "vae.pth", "drafter.pth", "refiner.pth", "expected.pt", "expected_autocast.pt"],
         "par-small": ["config.json", "gpt.pth", "expected.pt"]}


def test_default_location_is_the_tree(monkeypatch):
    monkeypatch.delenv("VARCORE_GOLDEN", raising=False)
    assert conftest._golden_root() == conftest.REPO_ROOT / "tests" / "golden"


def test_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("VARCORE_GOLDEN", str(tmp_path))
    assert conftest._golden_root() == tmp_path


@pytest.mark.parametrize("folder", sorted(FILES))
def test_every_file_is_there_and_loads_without_pickled_code(folder):
    root = conftest.GOLDEN_IN_TREE / folder
    for name in FILES[folder]:
        path = root / name
        assert path.is_file(), path
        if name == "config.json":
            assert isinstance(json.loads(path.read_text()), dict)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
            assert isinstance(data, dict) and data, path
