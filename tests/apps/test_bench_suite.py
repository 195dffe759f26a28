"""benchmarks/run_all.py helpers: work models against brute-force counts, ceiling shares, GPU floors, plots."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import costs  # noqa: E402
import run_all  # noqa: E402

from varcore.ops import attention as att  # noqa: E402


@pytest.mark.parametrize("L", [680, 2240])
def test_attention_flops_count_the_visible_pairs(L):
    from bench_attention import SCHEDULES

    ends = att.var_visible_end(SCHEDULES[L])
    pairs = int(ends.long().sum())  # query i sees keys [0, ends[i])
    assert run_all._attention_flops(L, "forward") == 2 * 2 * 4 * 16 * 64 * pairs
    assert run_all._attention_flops(L, "forward+backward") == 3 * run_all._attention_flops(L, "forward")


def test_quant_flops():
    from bench_quant import CVAE, PATCH_NUMS, V

    assert run_all._quant_flops("nearest_code N=100") == 2 * 100 * V * CVAE
    tokens = sum(pn * pn for pn in PATCH_NUMS)
    phi = 2 * 9 * CVAE * CVAE * 256
    assert run_all._quant_flops("msrq_encode B=2") == 2 * (2 * tokens * V * CVAE + len(PATCH_NUMS) * phi)
    assert run_all._quant_flops("upsample_sum B=3") == 3 * len(PATCH_NUMS) * phi
    assert run_all._quant_flops("something B=3") is None


def test_ceiling_shares_from_rows():
    ceil = {"fp32_gflops": 100.0, "bf16_gflops": 400.0, "mem_gbs": 10.0}
    results = {
        "par_order": {"status": "ok", "json": {"rows": [{"case": "gather", "kernel_GB/s": 5.0}]}},
        "sampler": {"status": "ok", "json": {"rows": [{"path": "fast bfloat16", "B": 8, "GFLOP_s": 100.0},
                                                      {"path": "drop-in float32", "B": 8, "GFLOP_s": 50.0}]}},
        "quant": {"status": "failed"},
    }
    rows = run_all.ceiling_shares(results, ceil)
    assert [(r["case"], r["share_pct"]) for r in rows] == [("gather", 50.0), ("fast bfloat16 B=8", 25.0),
                                                           ("drop-in float32 B=8", 50.0)]


def test_gpu_floor_var_d30_matches_the_known_figure():
    """VAR-d30 at 256 px with CFG: about 3.76 TFLOP in the transformer (3.8 ms at 989 TFLOP/s), computed here from
    the architecture."""
    cost = costs.var_image_cost("d30")
    assert cost["transformer_flops"] / 1e12 == pytest.approx(3.76, abs=0.03)
    assert cost["weight_bytes"] == pytest.approx(2 * 2.01e9, rel=0.01)
    gpt = costs.gpt_image_cost("GPT-B", grid=16, M=2)
    assert gpt["passes"] == 1 + 3 + (256 // 4 - 1)
    # linear FLOPs dominate: at least 2 * 2 (CFG) * tokens * parameters of the blocks
    assert gpt["transformer_flops"] > 2 * 2 * 256 * 12 * 12 * 768 * 768


def test_code_cost_is_the_drafter_scales_plus_the_refiner():
    """CoDe N: the d30 drafter's first N scales, the d16 refiner's prefill of them (no head) and its other scales;
    between the refiner alone and the drafter alone, growing with N."""
    d16, d30 = costs.var_image_cost("d16")["transformer_flops"], costs.var_image_cost("d30")["transformer_flops"]
    code = [costs.code_image_cost(n)["transformer_flops"] for n in (6, 7, 8, 9)]
    assert d16 < code[0] < code[1] < code[2] < code[3] < d30
    from varcore.models import VAR_CONFIGS

    _, var = VAR_CONFIGS["d16"].build(torch.device("meta"))
    head = 2 * 2 * var.C * var.V * var.begin_ends[7][1]  # both CFG halves, the tokens of scales 0..7
    assert costs.flops_per_image(var, 0, 8) - costs.flops_per_image(var, 0, 8, head=False) == pytest.approx(head)
    assert costs.flops_per_image(var, 0, 8) + costs.flops_per_image(var, 8) == pytest.approx(d16)


def test_fid_run_hours_cover_every_preset():
    from varcore.presets import PRESETS

    rows = {r["preset"]: r for r in costs.fid_run_hours()}
    assert set(rows) == set(PRESETS)
    assert rows["llamagen-xl"]["passes"] == 576 and rows["par-xl-4x"]["passes"] == 147
    assert rows["par-3b-16x"]["passes"] == 51 and rows["var-d36"]["px"] == 512
    # the same transformer: PAR's fewer passes only lower the weight-reading floor
    assert rows["par-xl-4x"]["TFLOP_img"] == pytest.approx(rows["llamagen-xl"]["TFLOP_img"])
    assert rows["par-xl-4x"]["H100-SXM5 h"] < rows["llamagen-xl"]["H100-SXM5 h"]
    # hours = 50,000 images x the per-image floor / utilisation
    twice = {r["preset"]: r for r in costs.fid_run_hours(utilisation=0.15)}
    assert twice["var-d16"]["A100-SXM4-80GB h"] == pytest.approx(2 * rows["var-d16"]["A100-SXM4-80GB h"])
    peak, _ = costs.GPUS["A100-SXM4-80GB"]
    assert rows["var-d16"]["A100-SXM4-80GB h"] == pytest.approx(
        50_000 * rows["var-d16"]["TFLOP_img"] * 1e12 / peak / 0.3 / 3600)


def test_bench_sampler_compares_auto_with_float32():
    import bench_sampler

    names = [bench_sampler._config_name(p, d) for p, d in [("drop-in", torch.float32), ("fast", torch.float32),
                                                            ("fast", torch.bfloat16), ("auto", torch.bfloat16)]]
    assert names == list(bench_sampler.CONFIGS)
    tokens = [torch.zeros(1, 1)]
    results = {(8, "fast", torch.float32): (100.0, None, tokens), (8, "auto", torch.float32): (105.0, None, tokens),
               (1, "auto", torch.bfloat16): (50.0, None, tokens)}  # no fp32 run at B=1: no ratio there
    rows = bench_sampler.ratios([], results, 1e9, {torch.float32: 1.0, torch.bfloat16: 1.0})
    assert rows == [{"ratio": "B=8: fast auto time / fast fp32 time", "value": pytest.approx(1.05)}]


def test_plots_draw_from_a_report(tmp_path):
    pytest.importorskip("matplotlib")
    import plots

    header = {"cpu": "x", "torch_threads": 1, "torch": "t", "commit": "c", "date": "d", "cores": 2,
              "load_average_start": [1.0]}
    data = {"header": header, "ceilings": {"fp32_gflops": 1.0, "bf16_gflops": 2.0, "mem_gbs": 3.0},
            "ceiling_shares": [{"benchmark": "b", "case": "c", "ceiling": "mem_gbs", "unit": "GB/s", "share_pct": 5.0}],
            "code_quality": [{"decoding": "CoDe N=1", "images_per_s": 3.0, "class_consistency": 0.9, "frechet": 2.0},
                             {"decoding": "VAR (drafter alone)", "images_per_s": 2.0, "class_consistency": 0.95,
                              "frechet": 1.0}],
            "accel_sweep": [{"config": "m:cfg_skip=1,vs=b", "class_consistency": 0.9,
                             "baseline": {"model": "b", "class_consistency": 0.95},
                             "vs_baseline": {"images_per_s": 1.4}}],
            "results": {"batch": {"status": "ok", "json": {"header": {"models": "m"}, "rows": [
                {"sampler": "VAR", "B": 1, "img_s": 1.0, "kv_KiB": 4.0},
                {"sampler": "VAR", "B": 8, "img_s": 6.0, "kv_KiB": 32.0}]}},
                "quant": {"status": "ok", "json": {"rows": [{"case": "q", "speedup": 2.0}]}},
                "accel": {"status": "ok", "json": {"header": {"families": {"var": {"baseline": "plain"}}}, "rows": [
                    {"family": "var", "case": "plain", "speedup": 1.0},
                    {"family": "var", "case": "prune", "speedup": 1.5}]}}}}
    assert ("accel var prune vs plain", 1.5) in plots.speedups(data)
    assert not any("accel var plain" in label for label, _ in plots.speedups(data))
    paths = plots.draw_all(data, tmp_path)
    assert {p.name for p in paths} == {"speedup.png", "images_per_s.png", "code_speed_quality.png", "kv_cache.png",
                                      "ceiling_share.png", "accel_speed_quality.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


# ---------------------------------------------------------------------------------------------- bench_accel
def _counted_flops(monkeypatch, call):
    """(GEMM FLOPs, attention FLOPs) of ``call()``, counted independently of the FLOP model: FlopCounterMode's
    mm/addmm for every linear layer, and a spy on the blocks' attention for its visible (query, key) pairs (all of
    them without a mask, a block-causal mask's ends otherwise), 2 * 2 * head_dim FLOPs per pair, head and row."""
    from torch.utils.flop_counter import FlopCounterMode

    import varcore.models.basic_var as basic_var

    real, pairs = basic_var.attention, []

    def spy(q, k, v, attn_bias, scale, dropout_p=0.0):
        rows, heads, Lq, D = q.shape
        if attn_bias is None:
            visible = Lq * k.shape[2]
        else:
            assert isinstance(attn_bias, att.BlockCausalMask) and attn_bias.Lq == Lq
            visible = sum(attn_bias.ends)
        pairs.append(rows * heads * visible * 2 * 2 * D)
        return real(q, k, v, attn_bias, scale, dropout_p)

    monkeypatch.setattr(basic_var, "attention", spy)
    with FlopCounterMode(display=False) as counter:
        call()
    gemm = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    return gemm, sum(pairs)


def _model_split(flops: dict):
    runs = [flops] if "scales" in flops else [flops["drafter"], flops["refiner"]]
    gemm = sum(r["conditioning"] + sum(e["linear"] + e["head"] + e["embed"] for e in r["scales"]) for r in runs)
    attention = sum(e["attention"] for r in runs for e in r["scales"])
    assert gemm + attention == flops["total"]
    return gemm, attention


TINY_PNS = (1, 2, 3, 4, 5)


@pytest.mark.parametrize("prune, cfg_skip, dtype", [
    (None, 0, torch.float32), ({3: 0.5, 4: 0.4}, 0, torch.float32), (None, 2, torch.float32),
    ({2: 0.5, 4: 0.3}, 1, torch.float32), ({3: 0.5, 4: 0.25}, 1, torch.bfloat16)])
def test_var_flop_model_matches_the_counted_flops(monkeypatch, prune, cfg_skip, dtype):
    from tiny_var import tiny_vae, tiny_var
    from varcore.sampling.var import VARSampler

    var = tiny_var(tiny_vae(TINY_PNS), depth=3).eval()
    sampler, B = VARSampler(var, dtype=dtype), 3
    counted = _counted_flops(monkeypatch, lambda: sampler.sample(B, torch.tensor([1, 4, 7]), g_seed=0, cfg=2.0,
                                                                 prune=prune, cfg_skip=cfg_skip, output="tokens"))
    model = costs.var_run_flops(var, B, prune=prune, cfg_skip=cfg_skip, exact=dtype == torch.float32)
    assert _model_split(model) == counted
    plain = costs.var_run_flops(var, B)
    assert (model["total"] < plain["total"]) == (bool(prune) or cfg_skip > 0)


@pytest.mark.parametrize("N, prune, cfg_skip", [(2, None, 0), (2, {2: 0.5, 4: 0.4}, 1), (3, {1: 0.5, 4: 0.5}, 2)])
def test_code_flop_model_matches_the_counted_flops(monkeypatch, N, prune, cfg_skip):
    """CoDe: the drafter's scales, the refiner's block-causal prefill (its own scale pruned in the second case) and
    the refiner's other scales."""
    from tiny_var import tiny_vae, tiny_var
    from varcore.sampling.code import CoDeSampler

    vae = tiny_vae(TINY_PNS)
    drafter, refiner = tiny_var(vae, depth=3, seed=2).eval(), tiny_var(vae, depth=2, width=32, seed=3).eval()
    sampler, B = CoDeSampler(drafter, refiner, N), 2
    counted = _counted_flops(monkeypatch, lambda: sampler.sample(B, torch.tensor([1, 4]), g_seed=0, cfg=2.0,
                                                                 prune=prune, cfg_skip=cfg_skip, output="tokens"))
    assert _model_split(costs.code_call_flops(drafter, refiner, N, B, prune=prune, cfg_skip=cfg_skip)) == counted


def test_bench_accel_quick(tmp_path, capsys):
    """bench_accel --quick: every case against the plain sampler, the implied speed-up the FLOP model's ratio."""
    import json

    import bench_accel

    out = tmp_path / "accel.json"
    assert bench_accel.main(["--quick", "--repeats", "1", "--out", str(out)]) == 0
    assert "implied_speedup" in capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {r["case"]: r for r in data["rows"] if r["family"] == "var"}
    shape = bench_accel.SHAPES["quick"]
    SN, N = len(shape["patch_nums"]), shape["draft_steps"]
    assert list(rows) == ["plain", "prune", "cfg_skip=2", "prune+cfg_skip", f"CoDe N={N}",
                          f"CoDe N={N}+prune+cfg_skip"]
    plain = rows["plain"]
    assert plain["speedup"] == plain["implied_speedup"] == plain["share"] == 1
    for r in rows.values():
        assert r["passes"] == SN and r["s"] > 0
        assert r["speedup"] == pytest.approx(plain["s"] / r["s"])
        assert r["implied_speedup"] == pytest.approx(plain["GFLOP"] / r["GFLOP"])
        assert r["share"] == pytest.approx(r["speedup"] / r["implied_speedup"])
    assert rows["prune+cfg_skip"]["options"] == {"prune": {str(SN - 2): 0.5, str(SN - 1): 0.5}, "cfg_skip": 2}
    # each accelerator saves FLOPs, the stack more than either, CoDe with the stack the most
    g = {k: r["GFLOP"] for k, r in rows.items()}
    assert g["plain"] > g["prune"] > g["prune+cfg_skip"] and g["cfg_skip=2"] > g["prune+cfg_skip"]
    assert g[f"CoDe N={N}"] > g[f"CoDe N={N}+prune+cfg_skip"] == min(g.values())
    # the GPT family: plain raster decoding makes one pass per token; SJD fewer, whatever they cost
    gpt = {r["case"]: r for r in data["rows"] if r["family"] == "gpt"}
    assert list(gpt) == ["plain", "sjd=4", "sjd=8"] and gpt["plain"]["passes"] == 64
    assert all(r["GFLOP"] is None and r["share"] is None for r in gpt.values())
    assert gpt["plain"]["passes"] > gpt["sjd=4"]["passes"] >= gpt["sjd=8"]["passes"] >= 64 // 8


def test_bench_accel_families_are_table_entries(monkeypatch, tmp_path):
    """A family is one entry of FAMILIES: its cases are timed against its own baseline, in the same table."""
    import json

    import bench_accel

    calls = []

    def toy(args):
        slow = bench_accel.Case(lambda: calls.append("base") or sum(range(20000)), 4e9, lambda: 8)
        fast = bench_accel.Case(lambda: calls.append("fast") or sum(range(10000)), 1e9, lambda: 3, {"w": 4})
        timed = bench_accel.Case(lambda: calls.append("timed") or sum(range(10000)), None, lambda: 2)
        return bench_accel.Family("base", {"base": slow, "fast": fast, "timed": timed}, {"model": "toy"})

    monkeypatch.setitem(bench_accel.FAMILIES, "toy", toy)
    out = tmp_path / "toy.json"
    assert bench_accel.main(["--families", "toy", "--repeats", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    order = ["base", "fast", "timed"]
    rounds = [order[r % 3:] + order[:r % 3] for r in range(4)]
    assert calls == order + [name for rnd in rounds for name in rnd]  # warm-up, then rotating rounds
    rows = {r["case"]: r for r in data["rows"]}
    assert rows["fast"]["family"] == "toy" and rows["fast"]["passes"] == 3 and rows["fast"]["options"] == {"w": 4}
    assert rows["fast"]["implied_speedup"] == 4 and data["header"]["families"]["toy"]["baseline"] == "base"
    # a case without a FLOP model: time and passes only
    assert rows["timed"]["passes"] == 2 and rows["timed"]["speedup"] > 0
    assert rows["timed"]["GFLOP"] is rows["timed"]["implied_speedup"] is rows["timed"]["share"] is None
