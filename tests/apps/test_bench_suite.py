"""benchmarks/run_all.py helpers: work models against brute-force counts, ceiling shares, GPU floors, plots."""
import sys
from pathlib import Path

import pytest

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
            "results": {"batch": {"status": "ok", "json": {"header": {"models": "m"}, "rows": [
                {"sampler": "VAR", "B": 1, "img_s": 1.0, "kv_KiB": 4.0},
                {"sampler": "VAR", "B": 8, "img_s": 6.0, "kv_KiB": 32.0}]}},
                "quant": {"status": "ok", "json": {"rows": [{"case": "q", "speedup": 2.0}]}}}}
    paths = plots.draw_all(data, tmp_path)
    assert {p.name for p in paths} == {"speedup.png", "images_per_s.png", "code_speed_quality.png", "kv_cache.png",
                                      "ceiling_share.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
