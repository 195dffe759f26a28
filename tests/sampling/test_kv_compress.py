"""KV-cache compression (``kv_budget``, after ScaleKV): after a compressed scale each block keeps, per batch row and
head, the cached keys its observation window attends to most; the cache is allocated for the kept keys."""
import math
from dataclasses import replace

import pytest
import torch

import varcore.models.basic_var as basic_var
from tiny_var import agree as _agree, tiny_var, tiny_vae
from varcore.models.basic_var import KVPlan, StaticKVCache
from varcore.sampling.code import CoDeSampler
from varcore.sampling.var import VARSampler, keep_counts, kv_budgets

PATCH_NUMS = (1, 2, 3, 4, 5)
SN = len(PATCH_NUMS)
LABELS = torch.tensor([1, 4, 7])
KW = dict(g_seed=3, cfg=3.0, top_k=20, output="tokens")


@pytest.fixture(scope="module")
def var():
    return tiny_var(tiny_vae(PATCH_NUMS)).eval()


@pytest.fixture(scope="module")
def deep():
    return tiny_var(tiny_vae(PATCH_NUMS), depth=4, seed=5).eval()


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_kv_budgets():
    assert kv_budgets(None, PATCH_NUMS, 2) == kv_budgets({}, PATCH_NUMS, 2) == kv_budgets([], PATCH_NUMS, 2) \
        == [None] * SN
    assert kv_budgets({3: 0.5, 1: (0.25, 1)}, PATCH_NUMS, 2) == [None, (0.25, 1.0), None, (0.5, 0.5), None]
    assert kv_budgets([None, None, 0.5, (1, 0.75)], PATCH_NUMS, 2) == [None, None, (0.5, 0.5), (1.0, 0.75), None]


@pytest.mark.parametrize("kv_budget", [None, {3: 1.0}, [1.0, 1.0, 1.0, 1.0], {2: (1.0, 1.0), 3: 1}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neutral_setting_keeps_the_tokens(var, kv_budget, dtype):
    """Keeping everything is the plain sampler, bit for bit (the cache has the plain layout)."""
    sampler = VARSampler(var, dtype=dtype)
    assert _equal(sampler.sample(3, LABELS, kv_budget=kv_budget, **KW), sampler.sample(3, LABELS, **KW))
    assert sampler.kv_cache_bytes(3, kv_budget=kv_budget) == sampler.kv_cache_bytes(3)


def _held(depth, counts, budgets, start=0):
    """The documented rule, written out: the cache length, the shorter of two layouts (the one without a scratch
    where they tie). Blocks depth-1..0 own regions in that order, the last scale's tokens go after each block's kept
    keys. Without a scratch a region holds the most its block holds at any scale but the last, new tokens
    included. With one, the scales from the first compressed one to the last but one run through the scratch (the
    most any block holds there, after the regions): a region holds the most its block holds after writing a scale
    before that, or keeps after a scale from that on. A run from ``start`` writes scales 0..start at once."""
    held, written, before, kept = [0] * depth, 0, [], []
    for si, c in enumerate(counts[:-1]):
        written += c
        before.append(held)
        held = [h + c for h in held]
        if budgets[si] is not None:
            held = [min(h, max(1, round(r * written))) for h, r in zip(held, budgets[si])]
        kept.append(held)
    first = next((si for si in range(len(kept)) if kept[si] != [h + counts[si] for h in before[si]]), None)

    def length(region, scratch=0):
        return max([sum(region) + scratch] + [sum(region[j + 1:]) + held[j] + counts[-1] for j in range(depth)])

    need = [max(b[j] + c for b, c in zip(before, counts)) for j in range(depth)]
    if first is None:
        return length(need)
    region = [max([before[si][j] + counts[si] for si in range(start, first)] + [k[j] for k in kept[first:]])
              for j in range(depth)]
    scratch = max(before[si][j] + counts[si] for si in range(first, len(kept)) for j in range(depth))
    return min(length(need), length(region, scratch))


def _cache_bytes(sampler, seen):
    real = sampler._cache

    def cache(*args):
        kv = real(*args)
        seen.append(kv.nbytes)
        return kv

    sampler._cache = cache


@pytest.mark.parametrize("kv_budget, prune", [({3: 0.5}, None), ({2: 0.5, 3: 0.3}, None),
                                              ({1: (0.5, 1.0, 0.25, 0.75), 3: (0.2, 0.6, 0.4, 1.0)}, None),
                                              ({2: 0.5, 3: 0.4}, {3: 0.5}), ([0.7, 0.5, 0.5, 0.4], {2: 0.5, 4: 0.3})])
def test_the_kv_cache_holds_the_kept_keys_only(deep, kv_budget, prune):
    """The allocated cache is what kv_cache_bytes says, which is the documented rule; smaller than the plain one."""
    B, sampler, seen = len(LABELS), VARSampler(deep), []
    _cache_bytes(sampler, seen)
    sampler.sample(B, LABELS, prune=prune, kv_budget=kv_budget, **KW)
    counts = [pn * pn if k is None else k for pn, k in zip(PATCH_NUMS, keep_counts(prune, PATCH_NUMS))]
    T = _held(4, counts, kv_budgets(kv_budget, PATCH_NUMS, 4))
    assert seen == [sampler.kv_cache_bytes(B, prune=prune, kv_budget=kv_budget)] == [2 * 2 * B * deep.C * 4 * T]
    assert seen[0] < sampler.kv_cache_bytes(B, prune=prune)
    report = sampler.memory_report(B, prune, kv_budget)
    assert report["peak_bytes"] == seen[0] and report["plain_bytes"] == sampler.kv_cache_bytes(B)
    assert report["peak_ratio"] == seen[0] / report["plain_bytes"]


def test_a_single_compressed_scale_by_hand(var):
    """{3: 0.5} (depth 2): after scale 3 (30 tokens written) each block keeps 15 keys. With the scratch each
    region holds 15 (more than the 14 of scales 0..2) and the scratch 14 + 16 = 30 (scale 3), 60 in all; at the last
    scale block 0 writes its 25 after its 15 kept, at 15 + 15 + 25 = 55. Without it each region holds the 30 of
    scale 3 and block 0 writes its 25 at 30 + 15: 70. {3: 0.9} keeps 27: 27 + 27 + 30 = 84 with the scratch, 30 + 27
    + 25 = 82 without it, the layout chosen."""
    counts = [pn * pn for pn in PATCH_NUMS]
    half, mild = kv_budgets({3: 0.5}, PATCH_NUMS, 2), kv_budgets({3: 0.9}, PATCH_NUMS, 2)
    assert StaticKVCache.positions(2, PATCH_NUMS, None, half) == 60
    assert VARSampler(var).kv_cache_bytes(2, kv_budget={3: 0.5}) == 2 * 2 * 2 * var.C * 4 * 60
    staged = KVPlan.build(2, counts, half)
    assert staged.staged == (False, False, False, True, False) and staged.offsets == (15, 0)
    assert staged.scratch == 30 and staged.pos[3] == (14, 14) and staged.pos[4] == (15, 15)
    assert KVPlan.build(2, counts, half, scratch=False).T == 70
    assert [KVPlan.build(2, counts, mild, scratch=s).T for s in (True, False)] == [84, 82]
    assert KVPlan.build(2, counts, mild) == KVPlan.build(2, counts, mild, scratch=False)
    assert not any(KVPlan.build(2, counts, mild).staged)
    assert VARSampler(var).kv_cache_bytes(2, kv_budget={3: 0.9}) == 2 * 2 * 2 * var.C * 4 * 82
    with pytest.raises(TypeError, match="scratch must be None or a bool"):
        KVPlan.build(2, counts, half, scratch=1)


@pytest.mark.parametrize("kv_budget, prune, cfg_skip", [({3: 0.5}, None, 0), ({1: 0.5, 3: 0.4}, {3: 0.5}, 1),
                                                        ({1: (0.5, 1.0, 0.25, 0.75), 3: (0.2, 0.6, 0.4, 1.0)}, None,
                                                         0), ({0: 0.5, 2: 0.3}, {1: 0.5}, 2)])
def test_both_layouts_keep_the_same_keys(deep, monkeypatch, kv_budget, prune, cfg_skip):
    """The layout with the scratch (chosen here) draws the tokens of the one without it (keys compacted in place):
    the same keys are kept, in the same order."""
    kw = dict(kv_budget=kv_budget, prune=prune, cfg_skip=cfg_skip, **KW)
    assert VARSampler(deep)._cache(3, SN, None, kv_budgets(kv_budget, PATCH_NUMS, 4)).plan.scratch > 0
    staged = VARSampler(deep).sample(3, LABELS, **kw)
    real = KVPlan.build.__func__
    monkeypatch.setattr(KVPlan, "build", classmethod(lambda cls, *a: real(cls, *a, scratch=False)))
    in_place = VARSampler(deep).sample(3, LABELS, **kw)
    assert _equal(staged, in_place)


def _record(monkeypatch):
    """Record every attention call's (q, k, scale) (k cloned: compaction rewrites the cache) and every compaction's
    (block, keys held, kept indices)."""
    calls, compactions = [], []
    real_attention, real_compact = basic_var.attention, StaticKVCache.compact

    def attention(q, k, v, attn_bias, scale, dropout_p=0.0):
        calls.append((q.clone(), k.clone(), scale))
        return real_attention(q, k, v, attn_bias, scale, dropout_p)

    def compact(self, j, n, idx, rows=slice(None), staged=False):
        if idx is not None:  # a staged block that keeps everything only copies its keys back
            compactions.append((len(calls) - 1, j, n, idx.clone()))
        return real_compact(self, j, n, idx, rows, staged)

    monkeypatch.setattr(basic_var, "attention", attention)
    monkeypatch.setattr(StaticKVCache, "compact", compact)
    return calls, compactions


def _grid(pn):
    """ScaleKV's window: the centres of a min(4, pn)^2 grid of cells of the pn x pn map."""
    g = min(4, pn)
    s = pn // g
    centres = [i * s + (s - 1) // 2 for i in range(g)]
    return [r * pn + c for r in centres for c in centres]


@pytest.mark.parametrize("kv_budget, prune, cfg_skip", [({2: 0.5, 3: 0.4}, None, 0), ({3: (0.3, 0.7)}, None, 1),
                                                        ({2: 0.6, 3: 0.5}, {3: 0.5}, 0)])
def test_kept_keys_are_the_top_scoring_ones(var, monkeypatch, kv_budget, prune, cfg_skip):
    """Each compaction keeps, per row and head, the keys with the largest attention mass of the window queries
    (recomputed in float64 from the q and k of the model's attention call), and the next scale attends over exactly
    those keys, in order, followed by its own."""
    calls, compactions = _record(monkeypatch)
    sampler = VARSampler(var)
    sampler.sample(3, LABELS, kv_budget=kv_budget, prune=prune, cfg_skip=cfg_skip, **KW)
    keeps = keep_counts(prune, PATCH_NUMS)
    budgets = kv_budgets(kv_budget, PATCH_NUMS, 2)
    assert len(compactions) == 2 * sum(b is not None for b in budgets)
    depth = len(var.blocks)
    for call, j, n, idx in compactions:
        q, k, scale = calls[call]
        si = call // depth
        assert j == call % depth and k.shape[2] == n
        l = PATCH_NUMS[si] ** 2 if keeps[si] is None else keeps[si]
        window = _grid(PATCH_NUMS[si]) if keeps[si] is None else list(range(l))
        q_win = q[:, :, q.shape[2] - l:][:, :, window].double()
        mass = (q_win * scale @ k.double().transpose(-1, -2)).softmax(-1).sum(-2)
        written = sum(pn * pn if kk is None else kk for pn, kk in zip(PATCH_NUMS[:si + 1], keeps))
        keep = max(1, round(budgets[si][j] * written))
        assert idx.shape == (q.shape[0], q.shape[1], keep)
        ref = mass.topk(keep, dim=-1).indices.sort(-1).values
        assert torch.equal(idx, ref)
        q_next, k_next, _ = calls[call + depth]  # block j at the next scale
        rows = k_next.shape[0]
        kept = k[:rows].gather(2, idx[:rows].unsqueeze(-1).expand(-1, -1, -1, k.shape[3]))
        assert torch.equal(k_next[:, :, :keep], kept)
        assert k_next.shape[2] == keep + q_next.shape[2]


def _poison(sampler):
    """Make every KV cache of ``sampler`` start as NaN and every compaction leave NaN behind its kept keys in the
    block's region and in the whole scratch (and the spare positions after it), so that a read of a position no
    token wrote, of an evicted key, or of another block's staged keys shows."""
    real = sampler._cache

    def cache(*args):
        kv = real(*args)
        kv.k.fill_(float("nan"))
        kv.v.fill_(float("nan"))
        real_compact = kv.compact

        def compact(j, n, idx, rows=slice(None), staged=False):
            real_compact(j, n, idx, rows, staged)
            o, keep = kv.offsets[j], n if idx is None else idx.shape[2]
            end = kv.offsets[j - 1] if j else kv.scratch  # the region's end
            for buf in (kv.k, kv.v):
                buf[rows, :, o + keep:end] = float("nan")
                buf[rows, :, kv.scratch:] = float("nan")

        kv.compact = compact
        return kv

    sampler._cache = cache


@pytest.mark.parametrize("kv_budget, prune, cfg_skip, N", [({1: 0.6, 2: 0.5, 3: 0.4}, None, 0, 2),
                                                           ({3: 0.3}, {3: 0.5}, 1, 3),
                                                           ({2: (0.4, 0.8), 3: 0.5}, {2: 0.5, 4: 0.5}, 2, 1),
                                                           ({2: 0.9, 3: 0.9}, None, 0, 2)])
def test_compressed_runs_read_only_kept_keys(var, kv_budget, prune, cfg_skip, N):
    """Every scale attends over kept and newly written positions only (a read of an unwritten or evicted slot would
    read NaN and raise), alone and in CoDe's two stages (the refiner's prefill compressed in the first two cases);
    the last case's budgets are mild enough that the layout without a scratch is chosen."""
    kw = dict(kv_budget=kv_budget, prune=prune, cfg_skip=cfg_skip, **KW)
    sampler = VARSampler(var)
    clean = sampler.sample(3, LABELS, **kw)
    _poison(sampler)
    assert _equal(sampler.sample(3, LABELS, **kw), clean)
    code = CoDeSampler(var, var, draft_steps=N)
    clean = code.sample(3, LABELS, **kw)
    _poison(code.drafter_stage)
    _poison(code.refiner_stage)
    assert _equal(code.sample(3, LABELS, **kw), clean)


@pytest.mark.parametrize("kv_budget", [{2: 0.5}, {3: 0.3}, {1: 0.5, 3: 0.4}])
def test_scales_up_to_the_first_compressed_one_are_the_plain_ones(var, kv_budget):
    sampler = VARSampler(var)
    first = min(kv_budget)
    compressed, plain = sampler.sample(3, LABELS, kv_budget=kv_budget, **KW), sampler.sample(3, LABELS, **KW)
    assert _equal(compressed[:first + 1], plain[:first + 1])
    assert [t.shape for t in compressed] == [t.shape for t in plain]
    assert _agree(compressed[first + 1:], plain[first + 1:]) < 1  # fewer keys do change the draws


def test_kv_budget_composes_with_prune_and_cfg_skip(var):
    """A neutral budget leaves pruned and unguided runs as they are; a real one changes only the later scales."""
    sampler = VARSampler(var)
    kw = dict(prune={3: 0.5, 4: 0.4}, cfg_skip=1, **KW)
    base = sampler.sample(3, LABELS, **kw)
    assert _equal(sampler.sample(3, LABELS, kv_budget={2: 1.0, 3: 1.0}, **kw), base)
    both = sampler.sample(3, LABELS, kv_budget={3: 0.4}, **kw)
    assert _equal(both[:4], base[:4]) and not torch.equal(both[4], base[4])


@pytest.mark.parametrize("draft_steps, kv_budget", [(2, {3: 0.4}), (2, {2: 0.5, 3: 0.4}), (3, {1: 0.5, 3: 0.5}),
                                                    (1, {2: 0.5})])
def test_kv_budget_composes_with_code(var, draft_steps, kv_budget):
    """CoDe with one model as drafter and refiner: the drafter's scales are the single model's, compressed or not;
    where the drafter compresses nothing the refiner (which rebuilds every drafted key in its prefill, with another
    attention kernel: allow a rare near-tie) draws the single model's tokens too, a budget at its prefill scale
    included."""
    code = CoDeSampler(var, var, draft_steps=draft_steps)
    single = VARSampler(var)
    compressed = code.sample(3, LABELS, kv_budget=kv_budget, **KW)
    ref = single.sample(3, LABELS, kv_budget=kv_budget, **KW)
    assert _equal(compressed[:draft_steps], ref[:draft_steps])
    if min(kv_budget) >= draft_steps:
        assert _agree(compressed, ref) > 0.97
    assert _agree(compressed, single.sample(3, LABELS, **KW)) < 1


def test_code_pair_budgets_and_bytes():
    """Per-block ratios name the blocks of the model drawing the scale (a depth-3 drafter, a depth-2 refiner); the
    bytes of each stage's cache are what kv_cache_bytes says."""
    vae = tiny_vae(PATCH_NUMS)
    code = CoDeSampler(tiny_var(vae, depth=3, seed=2).eval(), tiny_var(vae, seed=3).eval(), draft_steps=3)
    kv_budget = {1: (0.5, 0.7, 1.0), 3: (0.3, 0.6)}
    seen = []
    _cache_bytes(code.drafter_stage, seen)
    _cache_bytes(code.refiner_stage, seen)
    tokens = code.sample(3, LABELS, kv_budget=kv_budget, **KW)
    expected = code.kv_cache_bytes(3, kv_budget=kv_budget)
    assert seen == [expected["drafter"], expected["refiner"]]
    assert expected["drafter"] == 2 * 2 * 3 * 64 * 4 * _held(3, [1, 4, 9], [None, (0.5, 0.7, 1.0), None])
    assert expected["refiner"] == 2 * 2 * 3 * 64 * 4 * _held(2, [pn * pn for pn in PATCH_NUMS],
                                                               [None, None, None, (0.3, 0.6), None], start=3)
    assert _equal(tokens[:2], code.sample(3, LABELS, **KW)[:2])
    report = code.memory_report(3, kv_budget=kv_budget)
    assert report["peak_bytes"] == max(seen[:2]) < code.memory_report(3)["peak_bytes"]


@pytest.mark.parametrize("bad", [{4: 0.5}, {-1: 0.5}, {True: 0.5}, {"3": 0.5}, {3: 0.0}, {3: 1.5}, {3: -0.2},
                                 {3: True}, {3: "0.5"}, {3: float("nan")}, {3: (0.5,)}, {3: (0.5, 0.5, 0.5)},
                                 {3: (0.5, 2.0)}, [0.5] * 3, [0.5] * 5, 0.5, "0.5"])
def test_kv_budget_rejects_bad_values(var, bad):
    match = r"kv_budget must be None, a dict \{scale index in \[0, 3\]: keep ratio in \(0, 1\] or 2 of them\}"
    with pytest.raises(ValueError, match=match):
        VARSampler(var).sample(2, 1, kv_budget=bad, output="tokens")
    with pytest.raises(ValueError, match=match):
        VARSampler(var).kv_cache_bytes(2, kv_budget=bad)
    with pytest.raises(ValueError, match=match):
        CoDeSampler(var, var, draft_steps=2).sample(2, 1, kv_budget=bad, output="tokens")


def test_compressed_blocks_run_in_row_chunks(var, monkeypatch):
    """Row chunks (forced here on small shapes) each score and compact their own rows of the cache."""
    import varcore.sampling.var as sampler_mod
    kw = dict(kv_budget={2: 0.5, 3: 0.4}, prune={3: 0.5}, cfg_skip=1, **KW)
    ref = VARSampler(var).sample(3, LABELS, **kw)
    seen, real = [], sampler_mod.row_chunks
    monkeypatch.setattr(sampler_mod, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(sampler_mod, "_MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(sampler_mod, "row_chunks", lambda *a: seen.append(a[:2]) or real(*a))
    chunked = VARSampler(var).sample(3, LABELS, **kw)
    assert (6, 9) in seen and (3, 25) in seen  # scale 2: 2B rows, compressed; scale 4: B rows, unguided
    # tiny GEMMs are not row-independent in every BLAS: allow a rare last-bit near-tie
    assert _agree(chunked, ref) > 0.97


def test_calibration_steps_run_eagerly(var):
    """kv_plan on a compiled sampler: the recording steps run eagerly, so the plan is the eager sampler's."""
    kw = dict(ratio=0.5, from_scale=1, cfg=3.0, top_k=20)
    compiled = VARSampler(var, compile={"backend": "aot_eager"})
    assert compiled.kv_plan(3, LABELS, 3, **kw) == VARSampler(var).kv_plan(3, LABELS, 3, **kw)


def test_compressed_step_compiles_without_graph_breaks(var):
    """The compressed forward pass (window scores, top-k, gather, copy) traces with fullgraph=True; aot_eager keeps
    the ops, so the tokens are the eager ones."""
    kw = dict(kv_budget={2: 0.5, 3: 0.4}, prune={3: 0.5}, **KW)
    compiled = VARSampler(var, compile={"backend": "aot_eager"})
    assert _equal(compiled.sample(3, LABELS, **kw), VARSampler(var).sample(3, LABELS, **kw))


def test_kv_plan_splits_drafters_and_refiners(deep, monkeypatch):
    """The plan's drafters are the blocks whose window attention is the most dispersed (normalised entropy,
    recomputed in float64 from the calibration call's attention), and the ratios average to ``ratio``."""
    calls, _ = _record(monkeypatch)
    sampler = VARSampler(deep)
    stats = {}
    plan = sampler.kv_plan(3, LABELS, 3, ratio=0.4, from_scale=2, drafters=0.5, cfg=3.0, top_k=20, stats=stats)
    assert sorted(plan) == sorted(stats) == [2, 3]
    depth = len(deep.blocks)
    for si in (2, 3):
        dispersion = []
        for j in range(depth):
            q, k, scale = calls[si * depth + j]
            q_win = q[:, :, q.shape[2] - PATCH_NUMS[si] ** 2:][:, :, _grid(PATCH_NUMS[si])].double()
            mass = (q_win * scale @ k.double().transpose(-1, -2)).softmax(-1).sum(-2)
            p = mass / mass.sum(-1, keepdim=True)
            dispersion.append(float((-(p * p.log()).sum(-1) / math.log(k.shape[2])).mean()))
        assert stats[si] == pytest.approx(dispersion, rel=1e-5)
        drafters = sorted(range(depth), key=lambda j: -dispersion[j])[:2]
        assert [plan[si][j] for j in drafters] == pytest.approx([0.6, 0.6])
        assert sorted(plan[si]) == pytest.approx([0.2, 0.2, 0.6, 0.6])
        assert sum(plan[si]) == pytest.approx(0.4 * depth)
    tokens = sampler.sample(3, LABELS, kv_budget=plan, **KW)
    assert _equal(tokens[:3], sampler.sample(3, LABELS, **KW)[:3])


@pytest.mark.parametrize("from_scale", [0, 2])
def test_code_kv_plan_splits_each_model_at_its_scales(from_scale):
    """CoDe's plan: the depth-4 drafter's blocks at its scales but its last, the depth-2 refiner's from its prefill
    scale on, each by the dispersion the calibration call measured in that model; a plan that samples."""
    vae = tiny_vae(PATCH_NUMS)
    code = CoDeSampler(tiny_var(vae, depth=4, seed=2).eval(), tiny_var(vae, seed=3).eval(), draft_steps=2)
    stats = {}
    plan = code.kv_plan(3, LABELS, 3, ratio=0.5, from_scale=from_scale, drafters=0.5, stats=stats)
    assert sorted(plan) == sorted(stats) == list(range(from_scale, 1)) + [2, 3]
    for si, ratios in plan.items():
        depth = 4 if si < 2 else 2
        assert len(ratios) == len(stats[si]) == depth
        drafters = sorted(range(depth), key=lambda j: -stats[si][j])[:depth // 2]
        assert [ratios[j] for j in drafters] == pytest.approx([0.75] * (depth // 2))
        assert sum(ratios) == pytest.approx(0.5 * depth)
    tokens = code.sample(3, LABELS, kv_budget=plan, **KW)
    assert code.kv_cache_bytes(3, kv_budget=plan)["refiner"] < code.kv_cache_bytes(3)["refiner"]
    assert _equal(tokens[:2 if from_scale else 1], code.sample(3, LABELS, **KW)[:2 if from_scale else 1])


@pytest.mark.parametrize("kw, match", [(dict(ratio=0.0, from_scale=2), "ratio must be"),
                                       (dict(ratio=float("nan"), from_scale=2),
                                        r"ratio must be a real number in \(0, 1\]"),
                                       (dict(ratio=0.5, from_scale=4), r"from_scale must be an int in \[0, 3\]"),
                                       (dict(ratio=0.5, from_scale=2, drafters=1.5), "drafters must be"),
                                       (dict(ratio=0.5, from_scale=2, drafter_ratio=0.3, drafters=0.5),
                                        r"drafter_ratio must lie in \[ratio, 1\]"),
                                       (dict(ratio=0.5, from_scale=2, drafters=0.75),
                                        r"drafter_ratio must lie in \[ratio, 1\]")])
def test_kv_plan_rejects_bad_values(deep, kw, match):
    with pytest.raises(ValueError, match=match):
        VARSampler(deep).kv_plan(2, 1, **kw)


def test_graph_key_follows_the_compression(var):
    sampler = VARSampler(var)
    state = sampler.call_state(LABELS)
    o = sampler.options(1.5, 0, 0.0, 1.0, False)[3]
    compressed = replace(o, kv_pos=(0, 0), kv_keep=(5, None))
    assert sampler.graph_key(compressed, state) != sampler.graph_key(o, state)
    assert sampler.graph_key(replace(compressed, kv_stage=True), state) != sampler.graph_key(compressed, state)


class _RunsTwice(VARSampler):
    """Runs each forward pass a first time on copies of its inputs before the real one, as a CUDA graph capture's
    warm-up does, undoing the first run's cache writes where ``rewrites_cache`` says (or never, ``undo=False``)."""

    undo = True

    def _run(self, phase, opts, inputs, state):
        if phase == "forward":
            saved = state.kv.k.clone(), state.kv.v.clone()
            self.forward(opts, *(None if t is None else t.clone() for t in inputs), state)
            if self.undo and self.rewrites_cache(opts):
                state.kv.k.copy_(saved[0])
                state.kv.v.copy_(saved[1])
        return super()._run(phase, opts, inputs, state)


@pytest.mark.parametrize("kv_budget, prune", [(None, None), ({2: 0.5, 3: 0.4}, None), ({2: 0.9, 3: 0.9}, {3: 0.5})])
def test_the_steps_that_rewrite_the_cache_are_known(var, kv_budget, prune):
    """A forward pass run twice (a graph capture's warm-up, then the capture) draws the tokens of one run where
    ``rewrites_cache`` undoes the first; without that, the last scale (plain) and the compressed ones differ."""
    kw = dict(kv_budget=kv_budget, prune=prune, **KW)
    ref = VARSampler(var).sample(3, LABELS, **kw)
    assert _equal(_RunsTwice(var).sample(3, LABELS, **kw), ref)
    careless = _RunsTwice(var)
    careless.undo = False
    assert not _equal(careless.sample(3, LABELS, **kw), ref)
