"""dtype="auto": bfloat16 only where the measured bf16 GEMM is clearly faster; cached per device and process."""
import pytest
import torch

from varcore.digits import load_bundled
from varcore.sampling import auto_dtype
from varcore.sampling.code import CoDeSampler
from varcore.sampling.var import VARSampler


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(auto_dtype, "_CHOICE", {})


@pytest.mark.parametrize("speedup,want", [(5.0, torch.bfloat16), (2.0, torch.bfloat16),
                                          (auto_dtype.SPEEDUP_NEEDED, torch.bfloat16), (1.1, torch.float32),
                                          (0.6, torch.float32)])
def test_the_decision_follows_the_measurement(speedup, want):
    # the figures of the machines measured: 5x (Xeon, AMX), 2x (Zen 4), 0.6x (Xeon without AMX)
    assert auto_dtype.resolve_dtype("auto", "cpu", measure=lambda device: speedup) == want


def test_measured_once_per_device():
    calls = []

    def measure(device):
        calls.append(device)
        return 3.0

    for _ in range(3):
        assert auto_dtype.resolve_dtype("auto", "cpu", measure=measure) == torch.bfloat16
    assert calls == [torch.device("cpu")]


def test_other_dtypes_pass_through_unmeasured():
    def measure(device):
        raise AssertionError("measured")

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert auto_dtype.resolve_dtype(dt, "cpu", measure=measure) is dt


def test_devices_without_a_measurable_bf16_gemm_get_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_dtype.resolve_dtype("auto", "cuda:0", measure=lambda d: 10.0) == torch.float32
    assert auto_dtype.resolve_dtype("auto", "meta", measure=lambda d: 10.0) == torch.float32


def test_the_real_measurement_is_a_positive_ratio():
    assert auto_dtype.bf16_speedup("cpu") > 0


@pytest.mark.parametrize("choice", [torch.bfloat16, torch.float32])
def test_samplers_take_auto(monkeypatch, choice):
    monkeypatch.setattr(auto_dtype, "_CHOICE", {("cpu", None): choice})
    vae, var = load_bundled("digits-var")
    assert VARSampler(var, vae, dtype="auto").dtype == choice
    vae, drafter, refiner, n = load_bundled("digits-code")
    assert CoDeSampler(drafter, refiner, n, vae, dtype="auto").dtype == choice


def test_bad_dtype_names_auto_in_the_message():
    vae, var = load_bundled("digits-var")
    with pytest.raises(ValueError, match="or 'auto'"):
        VARSampler(var, vae, dtype="fast")


def test_sample_ddp_records_the_resolved_dtype(monkeypatch, tmp_path):
    import json

    from varcore import sample_ddp

    monkeypatch.setattr(auto_dtype, "_CHOICE", {("cpu", None): torch.bfloat16})
    sample_ddp.main(["--model", "digits-var", "--per-class", "1", "--classes", "0", "--dtype", "auto", "--device",
                     "cpu", "--out", str(tmp_path), "--no-progress"])
    assert json.loads((tmp_path / "run.json").read_text())["dtype"] == "bf16"


def test_varcore_sample_takes_a_dtype(monkeypatch, tmp_path, capsys):
    from varcore.__main__ import main

    monkeypatch.setattr(auto_dtype, "_CHOICE", {("cpu", None): torch.bfloat16})
    out = tmp_path / "g.png"
    assert main(["sample", "--model", "digits-var", "--dtype", "auto", "--seeds", "0", "--classes", "1", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()
    assert main(["sample", "--model", "digits-par", "--dtype", "bf16", "--out", str(out), "--no-progress"]) == 2
    assert "GPT model must be torch.float32" in capsys.readouterr().err
