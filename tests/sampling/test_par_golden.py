"""PAR parity with the official code on the golden par-small model: teacher-forced logits and loss, and sampled
tokens (PAR and raster order) for every run in config.json."""
import json

import pytest
import torch

from varcore.checkpoints import load_gpt
from varcore.models.gpt import ModelArgs, Transformer, generate
from varcore.ops.par_order import par_scatter
from varcore.sampling.par import PARSampler
from varcore.train.gpt_trainer import to_par_order

from conftest import load_expected


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = golden_dir / "par-small"
    config = json.loads((folder / "config.json").read_text())
    M = config["M"]
    args = ModelArgs(dim=config["dim"], n_layer=config["n_layer"], n_head=config["n_head"],
                     vocab_size=config["vocab_size"], block_size=config["grid"] ** 2,
                     num_classes=config["num_classes"], spe_token_num=M * M - 1, ar_token_num=M * M)
    model = Transformer(args)
    model.load_state_dict(torch.load(folder / "gpt.pth", map_location="cpu", weights_only=True), strict=True)
    return config, model.eval(), load_expected(folder)


def test_load_gpt_infers_the_architecture(golden_dir, golden):
    config, model, _ = golden
    loaded = load_gpt(golden_dir / "par-small" / "gpt.pth", block_size=config["grid"] ** 2, n_head=config["n_head"])
    assert (loaded.M, loaded.n_layer, loaded.config.dim) == (config["M"], config["n_layer"], config["dim"])
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_par_order_of_codes(golden):
    config, _, exp = golden
    assert torch.equal(to_par_order(exp["codes_raster"], config["M"]), exp["codes_par_order"])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_forced_logits_and_loss(golden, mode):
    _, model, exp = golden
    z = exp["codes_par_order"]
    model.train(mode == "train")
    # dropouts off so that train mode is deterministic, as in the golden run
    saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    class_drop = model.cls_embedding.dropout_prob
    try:
        for m, _ in saved:
            m.p = 0.0
        model.cls_embedding.dropout_prob = 0.0
        with torch.no_grad():
            logits, loss = model(idx=z[:, :-1], cond_idx=exp["labels"], targets=z)
    finally:
        for m, p in saved:
            m.p = p
        model.cls_embedding.dropout_prob = class_drop
        model.eval()
    assert logits.shape == exp["train_logits"].shape
    torch.testing.assert_close(logits, exp["train_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, exp["train_loss"], atol=1e-5, rtol=0)


def _runs(golden_dir):
    path = golden_dir / "par-small" / "config.json"
    return json.loads(path.read_text())["samples"] if path.is_file() else []


def test_every_golden_sample(golden_dir, golden):
    config, model, exp = golden
    runs = _runs(golden_dir)
    assert runs, "config.json lists no samples"
    for i, run in enumerate(runs):
        n = config["M"] ** 2
        torch.manual_seed(run["seed"])
        tokens = generate(model, exp["labels"], config["grid"] ** 2, cfg_scale=run["cfg_scale"], ar_token_num=n,
                          spe_token_num=n - 1, temperature=run["temperature"], top_k=run["top_k"],
                          top_p=run["top_p"])
        assert tokens.dtype == torch.int32
        assert torch.equal(tokens, exp[f"sample{i}_par_order"]), f"sample{i} (PAR order)"
        assert torch.equal(par_scatter(tokens, config["M"]), exp[f"sample{i}_raster"]), f"sample{i} (raster)"

        # the sampler with its own generator draws the same numbers as the seeded global RNG on the CPU
        gen = torch.Generator().manual_seed(run["seed"])
        raster = PARSampler(model).sample_tokens(exp["labels"], cfg_scale=run["cfg_scale"], top_k=run["top_k"],
                                                 top_p=run["top_p"], temperature=run["temperature"], generator=gen)
        assert torch.equal(raster, exp[f"sample{i}_raster"].long()), f"sample{i} (sampler, raster)"
