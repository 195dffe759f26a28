"""Dependency probe: estimators on constructed cases with known answers, the GPT dependency measure against a
brute-force computation and a Markov chain with a known KL, VAR prediction entropy on a head with known output."""
import math

import pytest
import torch
import torch.nn.functional as F

from varcore import probe
from varcore.models import VAR, VQVAE
from varcore.models.gpt import ModelArgs, Transformer


def h_binary(e):
    return -e * math.log(e) - (1 - e) * math.log(1 - e)


# ---------------------------------------------------------------- mutual information
@pytest.mark.parametrize("V,seed", [(4, 0), (16, 1), (64, 2)])
def test_mi_independent_is_zero_after_baseline(V, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, V, (40000,), generator=g)
    b = torch.randint(0, V, (40000,), generator=g)
    r = probe.mutual_information(a, b, permutations=8)
    assert r.plugin > 0  # the plug-in estimator is biased upwards
    assert abs(r.corrected) < 0.15 * r.plugin + 2e-3
    assert r.h_a == pytest.approx(math.log(V), abs=0.01)


@pytest.mark.parametrize("V,seed", [(3, 0), (50, 1)])
def test_mi_copied_equals_entropy(V, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, V, (5000,), generator=g) ** 2 + 7  # non-dense ids
    r = probe.mutual_information(a, a.clone(), permutations=0)
    assert r.plugin == pytest.approx(probe.plugin_entropy(a), rel=1e-12)
    assert r.plugin == pytest.approx(r.h_a, rel=1e-12)


@pytest.mark.parametrize("e,seed", [(0.05, 0), (0.2, 1), (0.5, 2)])
def test_mi_binary_symmetric_channel(e, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (30000,), generator=g)
    flip = (torch.rand(30000, generator=g) < e).long()
    r = probe.mutual_information(a, a ^ flip, permutations=4)
    assert r.corrected == pytest.approx(math.log(2) - h_binary(e), abs=8e-3)
    assert r.normalized == pytest.approx(1 - h_binary(e) / math.log(2), abs=1e-2)


def test_plugin_entropy_known():
    x = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    assert probe.plugin_entropy(x) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_neighbour_pairs_and_mi():
    maps = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    a, b = probe.neighbour_pairs(maps)
    assert a.numel() == 2 * (3 * 3 + 2 * 4)
    assert set(zip(a.tolist(), b.tolist())) >= {(0, 1), (0, 4), (7, 11), (12, 13)}
    assert all(y - x in (1, 4) for x, y in zip(a.tolist(), b.tolist()))
    # constant rows: a horizontal neighbour equals its token, a vertical one is independent
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 8, (1500, 6, 1), generator=g).expand(1500, 6, 6)
    r = probe.neighbour_mi(rows)
    # pooled pairs: p(b | a) = 1/2 [b = a] + 1/2 uniform, so MI = H(B) - H(B | A) with H(B | A) of (9/16, 7 x 1/16)
    h_cond = -(9 / 16 * math.log(9 / 16) + 7 / 16 * math.log(1 / 16))
    assert r.corrected == pytest.approx(math.log(8) - h_cond, abs=5e-3)
    assert probe.neighbour_mi(torch.zeros(5, 1, 1, dtype=torch.long)) is None


def test_mi_bad_input():
    with pytest.raises(TypeError, match="a must be an integer tensor"):
        probe.mutual_information(torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="pair up"):
        probe.mutual_information(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="permutations"):
        probe.mutual_information(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), -1)


# ---------------------------------------------------------------- (a) GPT dependency
def markov_logits_fn(T_logits, G):
    """Token t depends only on its left neighbour in the same row (log-probabilities T_logits[prev]); the first
    token of a row is uniform."""
    def fn(tokens, labels):
        B, L = tokens.shape
        out = torch.zeros(B, L, T_logits.shape[0])
        prev = tokens[:, :-1]
        rows = T_logits[prev]  # (B, L-1, V) prediction of token t+1
        keep = (torch.arange(1, L) % G != 0)[None, :, None]
        out[:, 1:] = torch.where(keep, rows, 0.0)
        return out
    return fn


@pytest.mark.parametrize("seed", [0, 1])
def test_gpt_dependency_markov_chain_known_kl(seed):
    V, G, B = 3, 4, 6
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(V, V, generator=g) * 2
    logp = F.log_softmax(T, -1)
    tokens = torch.randint(0, V, (B, G * G), generator=g)
    res = probe.gpt_dependency(markov_logits_fn(T, G), tokens, torch.zeros(B, dtype=torch.long), G,
                               resamples=400, generator=g)
    # expected KL for the right neighbour: E_{x' ~ p(x_i | x_<i)} KL(T[x_i] || T[x'])
    kl = (logp.exp()[:, None, :] * (logp[:, None, :] - logp[None, :, :])).sum(-1)  # [x, x']
    expected = []
    for b in range(B):
        for i in range(G * G):
            if i % G == G - 1:
                continue  # no right neighbour in the row
            p_src = torch.full((V,), 1 / V) if i % G == 0 else logp[tokens[b, i - 1]].exp()
            expected.append(float((p_src * kl[tokens[b, i]]).sum()))
    assert res["by_offset"][(0, 1)] == pytest.approx(sum(expected) / len(expected), rel=0.06)
    assert all(v == 0 for off, v in res["by_offset"].items() if off != (0, 1))
    assert set(res["by_distance"]) == set(range(1, G))
    assert res["by_distance"][2] == 0 and res["by_distance"][1] > 0


def tiny_gpt(seed=0, G=4):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=32, n_layer=2, n_head=2, vocab_size=11, block_size=G * G, num_classes=3,
                              spe_token_num=0, ar_token_num=1, multiple_of=8))
    torch.nn.init.normal_(m.output.weight, std=0.5)
    return m.eval()


def test_gpt_dependency_matches_brute_force():
    G, B = 4, 3
    model = tiny_gpt()
    fn = probe.gpt_logits_fn(model)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (B, G * G), generator=g)
    labels = torch.tensor([0, 2, 1])
    i = 5
    res = probe.gpt_dependency(fn, tokens, labels, G, positions=[i], resamples=2,
                               generator=torch.Generator().manual_seed(9), chunk=2)
    # the same draws, one sequence at a time
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        base = F.log_softmax(fn(tokens, labels), -1)
        drawn = torch.multinomial(base[torch.arange(B).repeat_interleave(2), i].exp(), 1, generator=gen)[:, 0]
        totals = torch.zeros(G * G)
        for r, b in enumerate(torch.arange(B).repeat_interleave(2).tolist()):
            mod = tokens[b:b + 1].clone()
            mod[0, i] = drawn[r]
            lp = F.log_softmax(fn(mod, labels[b:b + 1]), -1)[0]
            totals += (base[b].exp() * (base[b] - lp)).sum(-1)
    for j in range(i + 1, G * G):
        off = (j // G - i // G, j % G - i % G)
        assert res["by_offset"][off] == pytest.approx(float(totals[j]) / (2 * B), rel=1e-4, abs=1e-7)
    assert float(totals[: i + 1].abs().max()) < 1e-5  # causal: no earlier prediction moves


def test_gpt_logits_fn_checks():
    with pytest.raises(TypeError, match="model must be"):
        probe.gpt_logits_fn(object())
    torch.manual_seed(0)
    par = Transformer(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=11, block_size=16, multiple_of=8))
    with pytest.raises(ValueError, match="raster-trained"):
        probe.gpt_logits_fn(par)
    with pytest.raises(ValueError, match="grid"):
        probe.gpt_dependency(probe.gpt_logits_fn(tiny_gpt()), torch.zeros(2, 16, dtype=torch.long),
                             torch.zeros(2, dtype=torch.long), 5)


def test_probe_gpt_runs_on_model_samples():
    res = probe.probe_gpt(tiny_gpt(1), torch.tensor([0, 1, 2, 0]), positions=[0, 3, 6], resamples=1)
    assert set(res["by_distance"]) <= set(range(1, 4)) and all(v >= 0 for v in res["by_distance"].values())


# ---------------------------------------------------------------- (b) VAR prediction entropy
PNS = (1, 2, 3)


def tiny_var(seed=0):
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    var = VAR(vae, num_classes=3, depth=1, embed_dim=32, num_heads=2, patch_nums=PNS)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    return vae.eval(), var.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_var_prediction_entropy_known_head(seed):
    vae, var = tiny_var(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        var.head.weight.zero_()  # every prediction is softmax(bias): known entropy
        var.head.bias.copy_(torch.randn(16, generator=g) * 2)
    p = var.head.bias.detach().softmax(-1)
    expected = float(-(p * p.log()).sum())
    idx = [torch.randint(0, 16, (5, pn * pn), generator=g) for pn in PNS]
    ent = probe.var_prediction_entropy(var, vae, idx, torch.tensor([0, 1, 2, 0, 1]), chunk=2)
    assert ent == pytest.approx([expected] * len(PNS), rel=1e-5)


def test_var_prediction_entropy_matches_direct_forward():
    vae, var = tiny_var(2)
    g = torch.Generator().manual_seed(5)
    idx = [torch.randint(0, 16, (4, pn * pn), generator=g) for pn in PNS]
    labels = torch.tensor([2, 1, 0, 1])
    ent = probe.var_prediction_entropy(var, vae, idx, labels, chunk=3)
    with torch.no_grad():
        logp = F.log_softmax(var(labels, vae.quantize.idxBl_to_var_input(idx)), -1)
    h = -(logp.exp() * logp).sum(-1)
    for si, (b, e) in enumerate(var.begin_ends):
        assert ent[si] == pytest.approx(float(h[:, b:e].mean()), rel=1e-5)
    # the first scale sees only the class, so its prediction entropy differs between classes but not images
    assert len(ent) == len(PNS)


def test_probe_var_rows():
    vae, var = tiny_var(0)
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, 16, (40, pn * pn), generator=g) for pn in PNS]
    copied = [x[:, :1].expand_as(x).contiguous() for x in idx]  # every token of a map equal: MI = H
    rows = probe.probe_var(var, vae, idx, torch.zeros(40, dtype=torch.long), copied, permutations=2)
    assert [r["pn"] for r in rows] == list(PNS)
    assert "real_plugin" not in rows[0]  # 1 x 1 maps have no neighbours
    for r in rows[1:]:
        assert r["gen_plugin"] == pytest.approx(r["gen_h_a"], rel=1e-12)
        assert r["real_plugin"] < r["gen_plugin"]
        assert 0 < r["h_pred"] <= math.log(16) + 1e-6


def test_run_probe_and_report_on_saved_random_models(tmp_path):
    """The runner end to end on the digits architectures with random weights written to a folder."""
    from varcore.cli.probe import format_report
    from varcore.digits import recipe

    torch.manual_seed(0)
    vae = recipe.build("vqvae")
    recipe.save_weights("vqvae", vae, tmp_path)
    recipe.save_weights("var-drafter", recipe.build("var-drafter", vae=vae), tmp_path)
    gpt = recipe.build("gpt-raster")
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    recipe.save_weights("gpt-raster", gpt, tmp_path)
    report = probe.run_probe(split="test", weights_root=tmp_path, permutations=1, gpt_sequences=3, gpt_sources=2,
                             resamples=1, max_images=40)
    assert report["n_images"] == 40
    assert [r["pn"] for r in report["var"]] == list(recipe.PATCH_NUMS)
    # the saved VAR's head is zero-initialised: every prediction is uniform over the 512 codes
    assert all(r["h_pred"] == pytest.approx(math.log(512), rel=1e-4) for r in report["var"])
    assert report["gpt"]["grid"] == 16 and set(report["gpt"]["by_distance"]) <= {str(d) for d in range(1, 16)}
    text = format_report(report)
    assert "(a) raster GPT" in text and "(b) VAR" in text
