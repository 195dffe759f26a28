"""Data-parallel training: 2 gloo processes follow the loss trajectory of one process with the same global batch."""
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from varcore.models import VQVAE
from varcore.models.gpt import ModelArgs, Transformer
from varcore.train import distributed
from varcore.train.data import TokenPyramids

PATCH_NUMS = (1, 2, 3, 4)
V, CLASSES, N = 32, 5, 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank, world, port, fn, args, out):
    """Entry of a spawned process: the environment torchrun would set, then ``fn(*args)``; rank 0 saves the result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    history = fn(*args)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(history, f)


def _run_two_ranks(fn, args, tmp_path):
    out = tmp_path / "history_ws2.json"
    mp.start_processes(_as_rank, args=(2, _free_port(), fn, args, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return json.loads(out.read_text())


def _run_one(fn, args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _assert_same_trajectory(h1, h2, steps):
    assert len(h1) == len(h2) == steps
    for a, b in zip(h1, h2):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
    assert h1[-1]["loss"] < h1[0]["loss"]  # it learns (lr is high enough to show)


# ---------------------------------------------------------------------------------------------- VAR (command line)
@pytest.fixture(scope="module")
def var_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("var_ddp")
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=V, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=PATCH_NUMS, ch_mult=(1, 1))
    torch.save(vae.state_dict(), root / "vae.pth")
    L = sum(p * p for p in PATCH_NUMS)
    torch.save({"idx_BL": torch.randint(0, V, (N, L)), "labels": torch.randint(0, CLASSES, (N,))}, root / "tok.pt")
    return root


def _var_main(root, out, bs, iters):
    from varcore.train.var_trainer import main

    return main(["--vae", str(root / "vae.pth"), "--tokens", str(root / "tok.pt"), "--pn", "1_2_3_4",
                 "--depth", "2", "--width", "64", "--heads", "2", "--num-classes", str(CLASSES), "--bs", str(bs),
                 "--lr", "3e-3", "--wp", "1", "--iters", str(iters), "--cond-drop", "0", "--drop-path", "0",
                 "--workers", "0", "--out", str(out), "--save-every", "0", "--no-progress", "--device", "cpu"])


def test_var_trainer_two_gloo_ranks_match_one_process(var_files, tmp_path):
    steps = 6  # 2 epochs of 3 global batches of 8: the reshuffle per epoch is covered
    h2 = _run_two_ranks(_var_main, (var_files, tmp_path / "ws2", 8, steps), tmp_path)
    h1 = _run_one(_var_main, (var_files, tmp_path / "ws1", 8, steps))
    _assert_same_trajectory(h1, h2, steps)
    # one checkpoint (rank 0's), in the official nesting, with the same weights as the one-process run
    w1 = torch.load(tmp_path / "ws1" / "ckpt-last.pth", weights_only=True)["trainer"]["var_wo_ddp"]
    w2 = torch.load(tmp_path / "ws2" / "ckpt-last.pth", weights_only=True)["trainer"]["var_wo_ddp"]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5, msg=k)
    assert sorted(p.name for p in (tmp_path / "ws2").iterdir()) == ["ckpt-last.pth"]


def test_a_different_batch_split_changes_the_trajectory(var_files, tmp_path):
    """The comparison above can fail: a global batch of 4 instead of 8 gives other losses."""
    h8 = _run_one(_var_main, (var_files, tmp_path / "a", 8, 3))
    h4 = _run_one(_var_main, (var_files, tmp_path / "b", 4, 3))
    assert not math.isclose(h8[1]["loss"], h4[1]["loss"], rel_tol=1e-4)


# ---------------------------------------------------------------------------------------------- PAR (trainer API)
def _par_train(token_file, global_bs, iters):
    from varcore.train.gpt_trainer import GPTTrainer, train
    from varcore.train.var_trainer import TrainConfig

    env = distributed.setup("cpu")
    try:
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=V, num_classes=CLASSES, block_size=16,
                                      spe_token_num=3, ar_token_num=4, class_dropout_prob=0.0,
                                      token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0))
        trainer = GPTTrainer(model, TrainConfig(max_iters=iters, lr=3e-3, wpe=1.0), distributed=env.enabled)
        loader = distributed.make_loader(TokenPyramids(token_file), global_bs, env, seed=3)
        return train(trainer, loader, progress=False)
    finally:
        distributed.cleanup(env)


def test_par_trainer_two_gloo_ranks_match_one_process(tmp_path):
    torch.manual_seed(1)
    token_file = tmp_path / "codes.pt"
    torch.save({"idx_BL": torch.randint(0, V, (N, 16)), "labels": torch.randint(0, CLASSES, (N,))}, token_file)
    h2 = _run_two_ranks(_par_train, (str(token_file), 6, 5), tmp_path)
    h1 = _run_one(_par_train, (str(token_file), 6, 5))
    _assert_same_trajectory(h1, h2, 5)


# ---------------------------------------------------------------------------------------------- pieces
def test_make_loader_splits_the_global_batch_over_ranks():
    data = TokenPyramids({"idx_BL": torch.arange(40).view(20, 2), "labels": torch.arange(20)})
    one = [b[1].tolist() for b in distributed.make_loader(data, 8, distributed.DistEnv(), seed=5)]
    parts = [[b[1].tolist() for b in distributed.make_loader(data, 8, distributed.DistEnv(rank=r, world_size=4),
                                                             seed=5)] for r in range(4)]
    assert len(one) == 2 and all(len(p) == 2 for p in parts)
    for step in range(2):
        assert sorted(sum((p[step] for p in parts), [])) == sorted(one[step])


@pytest.mark.parametrize("bs,world,match", [(0, 1, "global_batch"), (6, 4, "multiple of the world size"),
                                            (32, 2, "fewer than one global batch")])
def test_make_loader_rejects_bad_batches(bs, world, match):
    data = TokenPyramids({"idx_BL": torch.zeros(20, 2, dtype=torch.long), "labels": torch.zeros(20)})
    with pytest.raises(ValueError, match=match):
        distributed.make_loader(data, bs, distributed.DistEnv(rank=0, world_size=world))


def test_distributed_trainer_needs_a_process_group():
    from varcore.train.gpt_trainer import GPTTrainer
    from varcore.train.var_trainer import TrainConfig

    model = Transformer(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=8, num_classes=2, block_size=4))
    with pytest.raises(ValueError, match="process group"):
        GPTTrainer(model, TrainConfig(max_iters=1), distributed=True)
    with pytest.raises(TypeError, match="distributed"):
        GPTTrainer(model, TrainConfig(max_iters=1), distributed="yes")
