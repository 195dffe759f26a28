"""varcore.sample_ddp: per-image seeds, shards, resume after a kill, world-size independence (2 gloo processes)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from varcore import sample_ddp
from varcore.digits import bundled_names
from varcore.models import VAR, VQVAE
from varcore.sampling.var import VARSampler

PATCH_NUMS = (1, 2, 3, 4)
NUM_CLASSES = 6


def _tiny_models(seed=0):
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=48, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=PATCH_NUMS, ch_mult=(1, 1),
                test_mode=True)
    var = VAR(vae, num_classes=NUM_CLASSES, depth=2, embed_dim=64, num_heads=2, attn_l2_norm=True,
              patch_nums=PATCH_NUMS)
    with torch.no_grad():  # weights that all matter (the official init makes the head nearly zero)
        for p in var.parameters():
            p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5)
    return vae.eval(), var.eval()


@pytest.fixture(scope="module")
def model_spec(tmp_path_factory):
    """Official-format checkpoint files of a random tiny VAE + VAR: 'vae.pth,var.pth'."""
    root = tmp_path_factory.mktemp("ckpt")
    vae, var = _tiny_models()
    torch.save(vae.state_dict(), root / "vae.pth")
    torch.save(var.state_dict(), root / "var.pth")
    return f"{root / 'vae.pth'},{root / 'var.pth'}"


def _cli(spec, out, per_class=3, classes="0,2,5", batch=2, extra=()):
    return ["--model", spec, "--per-class", str(per_class), "--classes", classes, "--out", str(out),
            "--batch-size", str(batch), "--cfg", "2.0", "--top-k", "20", "--top-p", "0.9", "--seed", "7",
            "--no-progress", *extra]


def _torchrun(nproc, args, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "varcore.sample_ddp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _wait(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]


def _children(pid):
    """Pids of the direct children of ``pid`` (torchrun starts each worker in a session of its own)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _load(out):
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        return f["arr_0"], f["labels"]


# ---------------------------------------------------------------------------------------------- pieces
def test_image_seed_is_a_function_of_seed_class_index():
    seeds = {(s, c, i): sample_ddp.image_seed(s, c, i) for s in range(3) for c in range(20) for i in range(20)}
    assert len(set(seeds.values())) == len(seeds)  # all distinct
    assert all(0 <= v < 2 ** 64 for v in seeds.values())
    assert all(sample_ddp.image_seed(*k) == v for k, v in seeds.items())  # stable
    for bad in [(-1, 0, 0), (0, -2, 0), (0, 0, 1.5), (True, 0, 0), (0, 0, 2 ** 20)]:
        with pytest.raises(ValueError, match="seed|cls|index"):
            sample_ddp.image_seed(*bad)


@pytest.mark.parametrize("classes,per_class,size", [([0, 1, 2], 4, 5), ([9, 3], 1, 1), ([4], 7, 32)])
def test_plan_covers_the_grid_in_class_major_order(classes, per_class, size):
    plan = sample_ddp.plan_shards(classes, per_class, size)
    items = [it for s in plan for it in s.items]
    assert items == [(c, i) for c in classes for i in range(per_class)]
    assert [s.number for s in plan] == list(range(len(plan)))
    assert all(len(s.items) == size for s in plan[:-1]) and 1 <= len(plan[-1].items) <= size


@pytest.mark.parametrize("kwargs,match", [
    (dict(classes=[], per_class=1, shard_size=1), "classes"),
    (dict(classes=[1, 1], per_class=1, shard_size=1), "classes"),
    (dict(classes=[0], per_class=0, shard_size=1), "per_class"),
    (dict(classes=[0], per_class=1, shard_size=0), "shard_size"),
])
def test_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_ddp.plan_shards(**kwargs)


# ---------------------------------------------------------------------------------------------- one process
def test_single_process_output_matches_the_sampler(model_spec, tmp_path):
    out = tmp_path / "run"
    sample_ddp.main(_cli(model_spec, out, per_class=3, classes="0,2,5", batch=4))
    arr, labels = _load(out)
    assert arr.dtype == np.uint8 and arr.shape == (9, 8, 8, 3)
    assert labels.tolist() == [0, 0, 0, 2, 2, 2, 5, 5, 5]
    # shard 1 = items 4..7 = (2,1) (2,2) (5,0) (5,1): sampled as one batch with the per-image seeds
    vae, var = _tiny_models()
    items = [(2, 1), (2, 2), (5, 0), (5, 1)]
    img = VARSampler(var, vae).sample(4, torch.tensor([c for c, _ in items]), cfg=2.0, top_k=20, top_p=0.9,
                                      seeds=[sample_ddp.image_seed(7, c, i) for c, i in items])
    want = img.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(arr[4:8], want)
    # a rerun resumes: nothing is sampled again, the same file comes out
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    sample_ddp.main(_cli(model_spec, out, per_class=3, classes="0,2,5", batch=4))
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes
    np.testing.assert_array_equal(_load(out)[0], arr)


def test_images_do_not_depend_on_the_class_list(model_spec, tmp_path):
    """Image (c, i) has the same seed whatever else is sampled; with one image per shard it is bit-identical."""
    sample_ddp.main(_cli(model_spec, tmp_path / "a", per_class=2, classes="1,4", batch=1))
    sample_ddp.main(_cli(model_spec, tmp_path / "b", per_class=3, classes="4", batch=1))
    a, _ = _load(tmp_path / "a")
    b, _ = _load(tmp_path / "b")
    np.testing.assert_array_equal(a[2:4], b[:2])
    assert not np.array_equal(a[0], a[1])  # different indices, different images


def test_rerun_with_other_settings_is_refused(model_spec, tmp_path):
    sample_ddp.main(_cli(model_spec, tmp_path, per_class=1, classes="0"))
    with pytest.raises(ValueError, match="other settings"):
        sample_ddp.main(_cli(model_spec, tmp_path, per_class=1, classes="0", extra=("--cfg", "3.0")))


def test_corrupt_and_partial_shards_are_redone(model_spec, tmp_path):
    sample_ddp.main(_cli(model_spec, tmp_path, per_class=2, classes="0,1", batch=1))
    good, _ = _load(tmp_path)
    shards = sorted((tmp_path / "shards").glob("shard_*.npz"))
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # torn write (not possible with the rename, but a disk can)
    shards[2].unlink()
    (tmp_path / "samples.npz").unlink()
    with pytest.warns(UserWarning, match="unreadable"):
        sample_ddp.main(_cli(model_spec, tmp_path, per_class=2, classes="0,1", batch=1))
    np.testing.assert_array_equal(_load(tmp_path)[0], good)


@pytest.mark.parametrize("extra,match", [
    (("--top-p", "1.5"), "--top-p"), (("--cfg", "-1"), "--cfg"), (("--temperature", "0"), "--temperature"),
    (("--top-k", "-3"), "--top-k"), (("--batch-size", "0"), "--batch-size"),
])
def test_bad_cli_values_are_refused_by_name(model_spec, tmp_path, extra, match, capsys):
    with pytest.raises(SystemExit):
        sample_ddp.main(_cli(model_spec, tmp_path, extra=extra))
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("classes,top_k,match", [("0,6", 20, "classes"), ("0", 49, "top_k")])
def test_values_outside_the_model_are_refused(model_spec, tmp_path, classes, top_k, match):
    with pytest.raises(ValueError, match=match):
        sample_ddp.main(_cli(model_spec, tmp_path, classes=classes, extra=("--top-k", str(top_k))))


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="model must be"):
        sample_ddp.main(["--model", "no-such-model", "--per-class", "1", "--classes", "0", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- two processes
def test_two_gloo_processes_equal_one_process(model_spec, tmp_path):
    args = dict(per_class=3, classes="0,1,3,5", batch=2)
    _wait(_torchrun(2, _cli(model_spec, tmp_path / "ws2", **args)))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers
    try:
        sample_ddp.main(_cli(model_spec, tmp_path / "ws1", **args))
    finally:
        torch.set_num_threads(torch_threads)
    a2, l2 = _load(tmp_path / "ws2")
    a1, l1 = _load(tmp_path / "ws1")
    assert a2.shape == (12, 8, 8, 3) and l2.tolist() == [0] * 3 + [1] * 3 + [3] * 3 + [5] * 3
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(a1, a2)
    assert len(list((tmp_path / "ws2" / "shards").glob("shard_*.npz"))) == 6


def test_killed_run_resumes_to_exactly_the_expected_set(model_spec, tmp_path):
    args = _cli(model_spec, tmp_path / "run", per_class=8, classes="0,1,2,3,4,5", batch=1)
    shards = tmp_path / "run" / "shards"
    proc = _torchrun(2, args)
    deadline = time.time() + 120
    workers = []
    try:
        while time.time() < deadline and len(list(shards.glob("shard_*.npz"))) < 4:
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-3000:]
            if len(workers) < 2:  # found before the first shard, so that the kill below is immediate
                workers = _children(proc.pid)
            time.sleep(0.005)
    finally:  # both workers, mid-run, as a crash would; then the launcher
        for pid in workers or _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()
    done = {p: p.stat().st_mtime_ns for p in shards.glob("shard_*.npz")}
    assert 4 <= len(done) < 48, f"the kill came too late to test a resume ({len(done)} of 48 shards done)"
    assert not (tmp_path / "run" / "samples.npz").exists()

    _wait(_torchrun(2, args))
    arr, labels = _load(tmp_path / "run")
    assert labels.tolist() == [c for c in range(6) for _ in range(8)]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished shards were not sampled again
    assert len(list(shards.glob("shard_*.npz"))) == 48
    # exactly the images of an uninterrupted run
    sample_ddp.main(_cli(model_spec, tmp_path / "ref", per_class=8, classes="0,1,2,3,4,5", batch=1))
    np.testing.assert_array_equal(arr, _load(tmp_path / "ref")[0])


def test_code_pair_from_paths(tmp_path):
    """VAE,DRAFTER,REFINER,N samples with CoDe; the shard equals CoDeSampler with the same per-image seeds."""
    from varcore.sampling.code import CoDeSampler

    vae, drafter = _tiny_models(seed=0)
    torch.manual_seed(1)
    refiner = VAR(vae, num_classes=NUM_CLASSES, depth=1, embed_dim=64, num_heads=2, attn_l2_norm=True,
                  patch_nums=PATCH_NUMS)
    with torch.no_grad():
        for p in refiner.parameters():
            p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5)
    for name, module in (("vae", vae), ("drafter", drafter), ("refiner", refiner.eval())):
        torch.save(module.state_dict(), tmp_path / f"{name}.pth")
    spec = f"{tmp_path / 'vae.pth'},{tmp_path / 'drafter.pth'},{tmp_path / 'refiner.pth'},2"
    sample_ddp.main(_cli(spec, tmp_path / "run", per_class=2, classes="1,3", batch=4))
    arr, labels = _load(tmp_path / "run")
    assert labels.tolist() == [1, 1, 3, 3]
    items = [(1, 0), (1, 1), (3, 0), (3, 1)]
    img = CoDeSampler(drafter, refiner, 2, vae).sample(
        4, torch.tensor([c for c, _ in items]), cfg=2.0, top_k=20, top_p=0.9,
        seeds=[sample_ddp.image_seed(7, c, i) for c, i in items])
    np.testing.assert_array_equal(arr, img.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="draft step count"):
        sample_ddp.load_sampler(spec[:-1] + "x", "cpu", top_k=20)


# ---------------------------------------------------------------------------------------------- never mixing runs
def _rewrite_shard(path, **changes):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)


@pytest.mark.parametrize("change", ["other seed", "no settings", "other size"])
def test_foreign_shards_are_resampled_also_without_run_json(model_spec, tmp_path, change):
    """A shard written under other settings (or by an older varcore, without them), or holding images of another
    size, is sampled again, even when run.json is gone; the result equals a clean run's."""
    sample_ddp.main(_cli(model_spec, tmp_path / "clean", per_class=2, classes="0,1", batch=1))
    good, _ = _load(tmp_path / "clean")
    # the same grid under --seed 8 gives other images: put one of its shards into the seed-7 folder
    sample_ddp.main(_cli(model_spec, tmp_path / "other", per_class=2, classes="0,1", batch=1,
                         extra=("--seed", "8")))
    out = tmp_path / "run"
    sample_ddp.main(_cli(model_spec, out, per_class=2, classes="0,1", batch=1))
    victim = sorted((out / "shards").glob("shard_*.npz"))[2]
    if change == "other seed":
        victim.write_bytes((tmp_path / "other" / "shards" / victim.name).read_bytes())
        match = "other settings"
    elif change == "no settings":
        _rewrite_shard(victim, settings=None, images=np.zeros_like(np.load(victim)["images"]))
        match = "other settings"
    else:
        with np.load(victim) as f:
            small = f["images"][:, ::2, ::2]
        _rewrite_shard(victim, images=np.ascontiguousarray(small))
        match = "sampling it again"
    (out / "run.json").unlink()
    (out / "samples.npz").unlink()
    with pytest.warns(UserWarning, match=match):
        sample_ddp.main(_cli(model_spec, out, per_class=2, classes="0,1", batch=1))
    np.testing.assert_array_equal(_load(out)[0], good)


def test_refused_settings_leave_no_run_json(model_spec, tmp_path):
    """A setting the model refuses (top_k above its vocabulary) is refused before run.json is written, so the
    corrected rerun in the same folder goes through."""
    with pytest.raises(ValueError, match="top_k"):
        sample_ddp.main(_cli(model_spec, tmp_path, per_class=1, classes="0", extra=("--top-k", "4000")))
    assert not (tmp_path / "run.json").exists()
    sample_ddp.main(_cli(model_spec, tmp_path, per_class=1, classes="0"))
    assert _load(tmp_path)[0].shape[0] == 1


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_damaged_run_json_is_named(model_spec, tmp_path, content, capsys):
    sample_ddp.main(_cli(model_spec, tmp_path, per_class=1, classes="0"))
    (tmp_path / "run.json").write_bytes(content)
    with pytest.raises(ValueError, match="run.json is damaged"):
        sample_ddp.main(_cli(model_spec, tmp_path, per_class=1, classes="0"))
    assert sample_ddp.cli(_cli(model_spec, tmp_path, per_class=1, classes="0")) == 2  # no traceback
    assert "run.json is damaged" in capsys.readouterr().err


def test_the_whole_50k_plan_has_distinct_streams():
    """Every (class, index) of the 50k ImageNet protocol under one base seed gets its own seed and a generator
    whose first draws differ from every other's on the CPU (where manual_seed would keep 32 bits only)."""
    from varcore.sampling.rng import seeded_generator

    seeds = [sample_ddp.image_seed(0, c, i) for c in range(1000) for i in range(50)]
    assert len(set(seeds)) == 50_000
    first = torch.stack([torch.rand(2, dtype=torch.float64, generator=seeded_generator(s)) for s in seeds])
    assert torch.unique(first, dim=0).shape[0] == 50_000


# ---------------------------------------------------------------------------------------------- model defaults
@pytest.mark.parametrize("name", bundled_names())
def test_bundled_models_run_with_their_own_defaults(name, tmp_path):
    """Every model `varcore sample` accepts, with the defaults of its family (VAR's top_p 0 and LlamaGen's 1.0 are
    both 'off')."""
    from varcore.digits import BUNDLED

    out = sample_ddp.main(["--model", name, "--per-class", "1", "--classes", "0,3", "--out", str(tmp_path),
                           "--no-progress"])
    arr, labels = _load(tmp_path)
    assert out == tmp_path / "samples.npz" and arr.shape == (2, 16, 16, 3) and labels.tolist() == [0, 3]
    record = json.loads((tmp_path / "run.json").read_text())
    gpt = BUNDLED[name].family == "gpt"
    assert (record["cfg"], record["top_k"], record["top_p"]) == (BUNDLED[name].cfg, 0, 1.0 if gpt else 0.0)


def _gpt_files(tmp_path, M=2, grid=4):
    """A tiny VQ-16 and a PAR GPT (M x M regions, grid x grid tokens) saved as the official files."""
    from tiny_gpt import tiny
    from varcore.models.vq16 import ModelArgs as VQArgs, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQArgs(codebook_size=16, codebook_embed_dim=8, z_channels=32, ch=32, encoder_ch_mult=[1, 2],
                        decoder_ch_mult=[1, 2], num_res_blocks=1)).eval()
    gpt = tiny(M=M, grid=grid, classes=4)
    torch.save({"model": vq.state_dict()}, tmp_path / "vq.pt")
    torch.save({"model": gpt.state_dict()}, tmp_path / "gpt.pt")
    return vq, gpt, f"{tmp_path / 'vq.pt'},{tmp_path / 'gpt.pt'}"


@pytest.fixture
def tiny_vq_loader(monkeypatch):
    """load_vq16 reads the codebook off the file but takes the rest of the architecture as arguments, and load_gpt
    the head count of a width without a named config: give them the tiny ones'."""
    import functools

    from varcore import checkpoints

    monkeypatch.setattr(checkpoints, "load_vq16", functools.partial(
        checkpoints.load_vq16, z_channels=32, ch=32, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
        num_res_blocks=1))
    monkeypatch.setattr(checkpoints, "load_gpt", functools.partial(checkpoints.load_gpt, n_head=2))


def test_gpt_checkpoint_by_path_with_per_image_seeds(tmp_path, tiny_vq_loader):
    """VQ_PATH,GPT_PATH samples with PARSampler from the per-image seeds, LlamaGen's defaults and its uint8
    conversion; --image-size resizes as the official evaluation does (384 -> 256 there, 8 -> 6 here)."""
    from varcore.sampling.par import PARSampler, to_uint8

    vq, gpt, spec = _gpt_files(tmp_path)
    out = tmp_path / "run"
    sample_ddp.main(["--model", spec, "--grid-size", "4", "--per-class", "2", "--classes", "1,3", "--batch-size",
                     "4", "--seed", "5", "--image-size", "6", "--out", str(out), "--no-progress"])
    arr, labels = _load(out)
    assert arr.shape == (4, 6, 6, 3) and labels.tolist() == [1, 1, 3, 3]
    record = json.loads((out / "run.json").read_text())
    assert (record["cfg"], record["top_k"], record["top_p"], record["image_size"]) == (1.5, 0, 1.0, 6)
    items = [(1, 0), (1, 1), (3, 0), (3, 1)]
    img = PARSampler(gpt, vq, fast=True).sample(torch.tensor([c for c, _ in items]), cfg_scale=1.5, image_size=6,
                                                seeds=[sample_ddp.image_seed(5, c, i) for c, i in items])
    np.testing.assert_array_equal(arr, to_uint8(img).numpy())


@pytest.mark.parametrize("extra,match", [(("--dtype", "bf16"), "GPT samplers run in fp32"),
                                         (("--more-smooth",), "no more_smooth"),
                                         (("--temperature", "1.0,1.1"), "one temperature"),
                                         (("--top-k", "17"), "top_k must be <= the vocabulary size 16")])
def test_gpt_refuses_var_only_settings(tmp_path, tiny_vq_loader, extra, match):
    _, _, spec = _gpt_files(tmp_path)
    with pytest.raises(ValueError, match=match):
        sample_ddp.main(["--model", spec, "--grid-size", "4", "--per-class", "1", "--classes", "0",
                         "--out", str(tmp_path / "run"), "--no-progress", *extra])


@pytest.mark.parametrize("model,grid,match", [("digits-var", 4, "VAR model and it has no token grid"),
                                              ("digits-par", 24, "its grid is 16")])
def test_grid_size_only_for_gpt_checkpoints_by_path(tmp_path, model, grid, match):
    with pytest.raises(ValueError, match=match):
        sample_ddp.main(["--model", model, "--grid-size", str(grid), "--per-class", "1", "--classes", "0",
                         "--out", str(tmp_path), "--no-progress"])


def test_gpt_zoo_names_load_from_the_root(tmp_path, tiny_vq_loader, monkeypatch):
    """A GPT zoo name reads LlamaGen's vq_ds16_c2i.pt and the released file from --root."""
    from varcore import checkpoints

    vq, gpt, _ = _gpt_files(tmp_path)
    (tmp_path / "vq.pt").rename(tmp_path / checkpoints.VQ16_FILE)
    (tmp_path / "gpt.pt").rename(tmp_path / checkpoints.GPT_ZOO["par-xl-4x"][0])
    monkeypatch.setattr(checkpoints, "load_gpt", lambda path, device="cpu": checkpoints.gpt_state_dict(path))
    monkeypatch.setenv("VARCORE_HOME", str(tmp_path))
    loaded_vq, state = checkpoints.from_pretrained("par-xl-4x")
    assert state.keys() == gpt.state_dict().keys()
    torch.testing.assert_close(loaded_vq.quantize.embedding.weight, vq.quantize.embedding.weight)
    facts = sample_ddp._model_facts("par-xl-4x")
    assert (facts.family, facts.num_classes, facts.vocab_size) == ("gpt", 1000, 16384)


def test_two_gloo_processes_equal_one_process_for_a_gpt(tmp_path):
    """The GPTs shard as the VARs do: per-image seeds make the file independent of the number of processes."""
    args = ["--model", "digits-par", "--per-class", "2", "--classes", "0,4,7", "--batch-size", "2", "--seed", "3",
            "--no-progress"]
    _wait(_torchrun(2, [*args, "--out", str(tmp_path / "ws2")]))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers
    try:
        sample_ddp.main([*args, "--out", str(tmp_path / "ws1")])
    finally:
        torch.set_num_threads(torch_threads)
    a2, l2 = _load(tmp_path / "ws2")
    a1, l1 = _load(tmp_path / "ws1")
    assert a2.shape == (6, 16, 16, 3) and l2.tolist() == [0, 0, 4, 4, 7, 7]
    np.testing.assert_array_equal(a1, a2)


def test_auto_dtype_is_rank_0s_choice_on_every_rank(tmp_path):
    """Each rank would measure its own dtype (here rank 1 is made to prefer bf16): rank 0's choice goes to all, so
    every shard is sampled and recorded in one dtype."""
    script = tmp_path / "run_ranks.py"
    script.write_text(
        "import os, sys, torch\n"
        "from varcore import sample_ddp\n"
        "from varcore.sampling import auto_dtype\n"
        "choice = torch.float32 if os.environ['RANK'] == '0' else torch.bfloat16\n"
        "auto_dtype._CHOICE[('cpu', None)] = choice\n"
        "sample_ddp.main(sys.argv[1:])\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--model", "digits-var", "--per-class", "2", "--classes", "0,1", "--batch-size", "1", "--dtype", "auto",
           "--device", "cpu", "--out", str(out), "--no-progress"]
    root = str(Path(sample_ddp.__file__).resolve().parents[1])  # the script runs outside the checkout
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait(proc)
    assert json.loads((out / "run.json").read_text())["dtype"] == "fp32"
    for shard in sorted((out / "shards").glob("shard_*.npz")):
        with np.load(shard) as f:
            assert json.loads(str(f["settings"]))["dtype"] == "fp32"
    assert _load(out)[0].shape == (4, 16, 16, 3)


def test_default_top_k_is_capped_at_the_vocabulary(model_spec, tmp_path):
    sample_ddp.main(["--model", model_spec, "--per-class", "1", "--classes", "0", "--out", str(tmp_path),
                     "--no-progress"])
    record = json.loads((tmp_path / "run.json").read_text())
    assert (record["cfg"], record["top_k"], record["top_p"]) == (1.5, 48, 0.96)  # V = 48 < the protocol's 900


# ---------------------------------------------------------------------------------------------- --accel
def test_accel_reaches_the_sampler_and_the_settings(model_spec, tmp_path):
    """``--accel`` (negative scale indices resolved for the model) gives the images of the sampler called with
    those options; it is part of the run's settings, so a rerun without it is refused, and a run without it
    records what it recorded before."""
    accel = "prune=-1:0.5,cfg_skip=1,draw=inverse_cdf"
    out = tmp_path / "run"
    sample_ddp.main(_cli(model_spec, out, per_class=2, classes="1,3", batch=4, extra=("--accel", accel)))
    arr, _ = _load(out)
    vae, var = _tiny_models()
    items = [(1, 0), (1, 1), (3, 0), (3, 1)]
    img = VARSampler(var, vae).sample(4, torch.tensor([c for c, _ in items]), cfg=2.0, top_k=20, top_p=0.9,
                                      seeds=[sample_ddp.image_seed(7, c, i) for c, i in items],
                                      prune={3: 0.5}, cfg_skip=1, draw="inverse_cdf")
    np.testing.assert_array_equal(arr, img.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert json.loads((out / "run.json").read_text())["accel"] == accel
    with pytest.raises(ValueError, match="other settings"):
        sample_ddp.main(_cli(model_spec, out, per_class=2, classes="1,3", batch=4))
    plain = tmp_path / "plain"
    sample_ddp.main(_cli(model_spec, plain, per_class=2, classes="1,3", batch=4))
    assert "accel" not in json.loads((plain / "run.json").read_text())
    assert not np.array_equal(_load(plain)[0], arr)


@pytest.mark.parametrize("accel,match", [
    ("sjd=4", "'sjd' is not an option of a var model"), ("prune=9:0.5", "scale index in \\[0, 3\\]"),
    ("cfg_skip=x", "cfg_skip='x': not an int"), ("draft_steps=2", "'draft_steps' is not an option of a var model"),
    ("draw=gumbel", "'gumbel' is not one of"), ("prune=-1:0.5,prune=-2:0.5", "prune is given twice"),
    ("kv_budget=-1:0.5", "kv_budget must be"),
])
def test_bad_accel_is_one_line_and_writes_nothing(model_spec, tmp_path, accel, match, capsys):
    out = tmp_path / "run"
    assert sample_ddp.cli(_cli(model_spec, out, extra=("--accel", accel))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample_ddp: error:") and "\n" not in err and "Traceback" not in err
    assert re.search(match, err), err
    assert not (out / "run.json").exists()


@pytest.mark.parametrize("name, accel, call", [
    ("digits-code8", "draft_steps=3,prune=-1:0.5", dict(prune={5: 0.5})),
    ("digits-raster", "sjd=4,draw=inverse_cdf", dict(sjd=4, draw="inverse_cdf")),
])
def test_accel_on_bundled_code_and_gpt(name, accel, call, tmp_path):
    """CoDe's split and the GPT options reach their samplers (the first shard's images against a direct call)."""
    from varcore.digits import DigitsSampler

    out = tmp_path / "run"
    sample_ddp.main(["--model", name, "--per-class", "1", "--classes", "0,7", "--out", str(out), "--batch-size",
                     "2", "--no-progress", "--accel", accel])
    arr, _ = _load(out)
    m = DigitsSampler(name).modules
    seeds = [sample_ddp.image_seed(0, c, 0) for c in (0, 7)]
    if name == "digits-code8":
        from varcore.sampling.code import CoDeSampler

        defaults = sample_ddp.model_defaults("code", 2.0, m.drafter.V)
        img = CoDeSampler(m.drafter, m.refiner, 3, m.vae).sample(
            2, torch.tensor([0, 7]), cfg=defaults["cfg"], top_k=defaults["top_k"], top_p=defaults["top_p"],
            seeds=seeds, **call)
        want = img.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    else:
        from varcore.sampling.par import PARSampler, to_uint8

        defaults = sample_ddp.model_defaults("gpt", 2.0, m.gpt.vocab_size)
        want = to_uint8(PARSampler(m.gpt, m.vq, fast=True).sample(
            torch.tensor([0, 7]), cfg_scale=defaults["cfg"], top_k=defaults["top_k"], top_p=defaults["top_p"],
            seeds=seeds, **call)).numpy()
    np.testing.assert_array_equal(arr, want)
