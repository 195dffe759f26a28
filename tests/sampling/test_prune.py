"""FastVAR-style cached token pruning (``prune``): a pruned scale runs its pivotal tokens through the blocks and
restores the others from the previous scale's hidden states."""
from dataclasses import replace

import pytest
import torch

from tiny_var import agree as _agree, phase_flops, tiny_var, tiny_vae
from varcore.sampling.code import CoDeSampler
from varcore.sampling.var import VARSampler, keep_counts

PATCH_NUMS = (1, 2, 3, 4, 5)
SN = len(PATCH_NUMS)
LABELS = torch.tensor([1, 4, 7])
KW = dict(g_seed=3, cfg=3.0, top_k=20, output="tokens")


@pytest.fixture(scope="module")
def var():
    return tiny_var(tiny_vae(PATCH_NUMS)).eval()


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_keep_counts():
    assert keep_counts(None, PATCH_NUMS) == [None] * SN
    assert keep_counts({}, PATCH_NUMS) == keep_counts([], PATCH_NUMS) == [None] * SN
    # round(12.5) = 12 (halves to even), round(0.25) = 0 -> at least 1, round(3.6) = 4 = all of scale 1
    assert keep_counts({4: 0.5, 3: 0.01, 1: 0.9}, PATCH_NUMS) == [None, None, None, 1, 12]
    assert keep_counts([1.0, 1.0, 0.5, 0.75, 1], PATCH_NUMS) == [None, None, 4, 12, None]


@pytest.mark.parametrize("prune", [None, [], {4: 1.0}, {1: 0.9, 0: 0.5}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neutral_setting_keeps_the_tokens(var, prune, dtype):
    """Ratio 1.0 (or a ratio that rounds to every token) is the plain sampler, bit for bit."""
    sampler = VARSampler(var, dtype=dtype)
    assert _equal(sampler.sample(3, LABELS, prune=prune, **KW), sampler.sample(3, LABELS, **KW))


@pytest.mark.parametrize("prune", [{3: 0.5}, {4: 0.3}, {2: 0.5, 3: 0.5, 4: 0.5}, [1, 1, 1, 0.6, 0.2]])
@pytest.mark.parametrize("more_smooth", [False, True])
def test_scales_before_the_first_pruned_one_are_the_plain_ones(var, prune, more_smooth):
    sampler = VARSampler(var)
    first = min(si for si, k in enumerate(keep_counts(prune, PATCH_NUMS)) if k is not None)
    imgs, pruned = sampler.sample(3, LABELS, prune=prune, more_smooth=more_smooth, **{**KW, "output": "both"})
    plain = sampler.sample(3, LABELS, more_smooth=more_smooth, **KW)
    assert _equal(pruned[:first], plain[:first])
    assert [t.shape for t in pruned] == [t.shape for t in plain]
    assert all(t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < var.V for t in pruned)
    assert _agree(pruned[first:], plain[first:]) < 0.9  # the restored tokens do change the draws
    assert imgs.shape[:2] == (3, 3) and bool(torch.isfinite(imgs).all())
    assert 0 <= float(imgs.min()) and float(imgs.max()) <= 1


def test_pivotal_tokens_and_restoration(var):
    """The kept tokens are those farthest from the scale's mean feature (the same for both CFG halves); the others
    take the previous scale's hidden states, area-upsampled, and the kept ones the blocks' outputs."""
    sampler = VARSampler(var)
    state = sampler.call_state(LABELS)
    opts = sampler.options(3.0, 20, 0.0, 1.0, False, prune={3: 0.5})
    o = replace(opts[3], cache_pos=var.begin_ends[3][0])
    x_BlC = torch.randn(3, 16, var.C).repeat(2, 1, 1)
    prev_BlC = torch.randn(6, 9, var.C)
    idx = sampler.pivotal(o, x_BlC, state)
    assert idx.shape == (6, 8) and torch.equal(idx[:3], idx[3:])
    feat = x_BlC[:3] - state.lvl_pos_1LC[:, var.begin_ends[3][0]:var.begin_ends[3][1]]
    score = (feat - feat.mean(1, keepdim=True)).square().sum(-1)
    assert torch.equal(idx[:3].sort(1).values, score.argsort(1, descending=True)[:, :8].sort(1).values)
    kept = torch.randn(6, 8, var.C)
    out = sampler.restore(3, prev_BlC, kept, idx)
    up = torch.nn.functional.interpolate(prev_BlC.transpose(1, 2).reshape(6, var.C, 3, 3), size=(4, 4),
                                         mode="area").flatten(2).transpose(1, 2)
    dropped = torch.ones(6, 16, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(out[dropped], up[dropped])
    assert torch.equal(out.gather(1, idx.unsqueeze(-1).expand(-1, -1, var.C)), kept)


def _linear_flops(sampler, **kw):
    """The counted GEMM FLOPs of the linear layers (mm/addmm) per (phase, scale) of one call."""
    return phase_flops(sampler, LABELS, ("aten.mm", "aten.addmm"), **KW, **kw)


def _block_flops(var, rows, tokens):
    """The blocks' linear layers on ``tokens`` tokens of ``rows`` rows: qkv (C -> 3C), proj (C -> C), fc1, fc2."""
    C, H = var.C, var.blocks[0].ffn.fc1.out_features
    return len(var.blocks) * rows * tokens * 2 * (3 * C * C + C * C + C * H + H * C)


@pytest.mark.parametrize("dtype, cfg_skip", [(torch.float32, 0), (torch.float32, 2), (torch.bfloat16, 1)])
def test_linear_flops_follow_the_kept_tokens(var, dtype, cfg_skip):
    """A scale's forward pass runs the blocks' linear layers on rows * keep tokens (rows = 2B, B when unguided);
    the head and the draw still cover every token."""
    sampler = VARSampler(var, dtype=dtype)
    prune = {2: 0.5, 3: 0.4, 4: 0.3}
    keeps = keep_counts(prune, PATCH_NUMS)
    plain, pruned = _linear_flops(sampler, cfg_skip=cfg_skip), _linear_flops(sampler, cfg_skip=cfg_skip, prune=prune)
    assert plain.keys() == pruned.keys()
    B = len(LABELS)
    for (phase, si), f in plain.items():
        rows = B if si >= SN - cfg_skip else 2 * B
        if phase == "draw":
            assert pruned[(phase, si)] == f > 0
            continue
        assert f == _block_flops(var, rows, PATCH_NUMS[si] ** 2)
        tokens = PATCH_NUMS[si] ** 2 if keeps[si] is None else keeps[si]
        assert pruned[(phase, si)] == _block_flops(var, rows, tokens), (si, pruned[(phase, si)])


@pytest.mark.parametrize("K", [1, 2])
def test_prune_composes_with_cfg_skip(var, K):
    """Pruned and skipped scales draw what pruned scales with guidance weight 0 draw (B rows instead of 2B: allow
    a rare near-tie); the scales before both are the plain ones."""
    sampler = VARSampler(var)
    prune = {3: 0.5, 4: 0.4}
    both = sampler.sample(3, LABELS, cfg_skip=K, prune=prune, **KW)
    opts = [o if o.si < SN - K else replace(o, cfg_t=0.0)
            for o in sampler.options(3.0, 20, 0.0, 1.0, False, prune=prune)]
    with sampler.eval_mode(), torch.no_grad():
        ref, _, _ = sampler.run(LABELS, [torch.Generator().manual_seed(3)], opts, "the reference")
    assert _equal(both[:3], sampler.sample(3, LABELS, **KW)[:3])
    assert _equal(both[:SN - K], ref[:SN - K])
    assert _agree(both[SN - K:], ref[SN - K:]) > 0.97


@pytest.mark.parametrize("draft_steps, prune", [(2, {2: 0.5, 3: 0.5, 4: 0.5}), (3, {3: 0.5, 4: 0.4}),
                                                (1, {2: 0.5, 4: 0.5}), (3, {2: 0.5, 4: 0.4})])
def test_prune_composes_with_code(var, draft_steps, prune):
    """CoDe with one model as drafter and refiner: the drafter's scales are the single model's, pruned or not. Where
    the drafter prunes nothing, the refiner (which rebuilds every drafted token's k/v in its prefill, with another
    attention kernel: allow a rare near-tie) draws the single model's tokens too, also where the prefill's own scale
    is pruned; a pruned drafter scale leaves the single model fewer keys there than the refiner."""
    code = CoDeSampler(var, var, draft_steps=draft_steps)
    single = VARSampler(var)
    pruned = code.sample(3, LABELS, prune=prune, **KW)
    ref = single.sample(3, LABELS, prune=prune, **KW)
    assert _equal(pruned[:draft_steps], ref[:draft_steps])
    assert all(0 <= int(t.min()) and int(t.max()) < var.V for t in pruned)
    if min(prune) >= draft_steps:
        assert _agree(pruned, ref) > 0.97
    assert _agree(pruned, single.sample(3, LABELS, **KW)) < 0.95


def test_prune_with_a_code_pair():
    vae = tiny_vae(PATCH_NUMS)
    sampler = CoDeSampler(tiny_var(vae, depth=3, seed=2).eval(), tiny_var(vae, seed=3).eval(), draft_steps=3)
    plain = sampler.sample(3, LABELS, **KW)
    for prune in ({3: 0.5}, {1: 0.5, 4: 0.3}, [1, 1, 0.5, 0.5, 0.5]):
        pruned = sampler.sample(3, LABELS, prune=prune, cfg_skip=1, **KW)
        first = min(si for si, k in enumerate(keep_counts(prune, PATCH_NUMS)) if k is not None)
        assert _equal(pruned[:first], sampler.sample(3, LABELS, cfg_skip=1, **KW)[:first])
        assert [t.shape for t in pruned] == [t.shape for t in plain]
        assert all(0 <= int(t.min()) and int(t.max()) < vae.quantize.vocab_size for t in pruned)


@pytest.mark.parametrize("bad", [{5: 0.5}, {-1: 0.5}, {True: 0.5}, {"3": 0.5}, {3: 0.0}, {3: 1.5}, {3: -0.2},
                                 {3: True}, {3: "0.5"}, {3: float("nan")}, {3: None}, [0.5] * 4, [0.5] * 6, 0.5,
                                 "0.5"])
def test_prune_rejects_bad_values(var, bad):
    match = r"prune must be None, a dict \{scale index in \[0, 4\]: keep ratio in \(0, 1\]\}"
    with pytest.raises(ValueError, match=match):
        VARSampler(var).sample(2, 1, prune=bad, output="tokens")
    with pytest.raises(ValueError, match=match):
        CoDeSampler(var, var, draft_steps=2).sample(2, 1, prune=bad, output="tokens")


def test_pruned_step_compiles_without_graph_breaks(var):
    """The pruned forward pass (top-k, gather, area upsampling, scatter) traces with fullgraph=True; aot_eager keeps
    the ops, so the tokens are the eager ones."""
    prune = {3: 0.5, 4: 0.4}
    compiled = VARSampler(var, compile={"backend": "aot_eager"})
    assert _equal(compiled.sample(3, LABELS, prune=prune, **KW), VARSampler(var).sample(3, LABELS, prune=prune, **KW))


def _poison(sampler):
    """Make every KV cache of ``sampler`` start as NaN, so that a read of a position no token wrote shows."""
    real = sampler._cache

    def cache(*args):
        kv = real(*args)
        kv.k.fill_(float("nan"))
        kv.v.fill_(float("nan"))
        return kv

    sampler._cache = cache


@pytest.mark.parametrize("prune, cfg_skip, N", [({2: 0.5, 3: 0.5, 4: 0.4}, 0, 2), ({3: 0.5}, 1, 3),
                                                ({2: 0.3, 4: 0.5}, 2, 1)])
def test_pruned_runs_read_only_written_cache_positions(var, prune, cfg_skip, N):
    """The kept tokens' k/v are packed: every scale attends over positions that earlier tokens wrote (a gap would
    read NaN and raise), alone and in CoDe's two stages (the refiner's prefill scale pruned in the first two
    cases)."""
    kw = dict(prune=prune, cfg_skip=cfg_skip, **KW)
    sampler = VARSampler(var)
    clean = sampler.sample(3, LABELS, **kw)
    _poison(sampler)
    assert _equal(sampler.sample(3, LABELS, **kw), clean)
    code = CoDeSampler(var, var, draft_steps=N)
    clean = code.sample(3, LABELS, **kw)
    _poison(code.drafter_stage)
    _poison(code.refiner_stage)
    assert _equal(code.sample(3, LABELS, **kw), clean)


def test_pruned_blocks_run_in_row_chunks(var, monkeypatch):
    """Row chunks (forced here on small shapes) cover the kept tokens of a pruned scale as they cover a full one."""
    import varcore.sampling.var as sampler_mod
    prune = {3: 0.5, 4: 0.4}
    ref = VARSampler(var).sample(3, LABELS, prune=prune, cfg_skip=1, **KW)
    seen, real = [], sampler_mod.row_chunks
    monkeypatch.setattr(sampler_mod, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(sampler_mod, "_MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(sampler_mod, "row_chunks", lambda *a: seen.append((a[:2], real(*a))) or seen[-1][1])
    chunked = VARSampler(var).sample(3, LABELS, prune=prune, cfg_skip=1, **KW)
    assert ((6, 8), [slice(r, r + 1) for r in range(6)]) in seen  # scale 3: 2B rows of 8 kept tokens, row by row
    assert ((3, 10), [slice(r, r + 1) for r in range(3)]) in seen  # scale 4, unguided: B rows of 10
    # tiny GEMMs are not row-independent in every BLAS: allow a rare last-bit near-tie
    assert _agree(chunked, ref) > 0.97


def _cache_bytes(sampler, seen):
    real = sampler._cache

    def cache(*args):
        kv = real(*args)
        seen.append(kv.nbytes)
        return kv

    sampler._cache = cache


@pytest.mark.parametrize("prune", [{3: 0.5}, {2: 0.5, 4: 0.4}, [1, 0.5, 0.5, 0.5, 0.5]])
def test_the_kv_cache_holds_the_kept_tokens_only(var, prune):
    """The cache is sized for the tokens the run writes: the kept ones (all of them before a refiner's start)."""
    B, sampler, seen = len(LABELS), VARSampler(var), []
    _cache_bytes(sampler, seen)
    sampler.sample(B, LABELS, prune=prune, **KW)
    keeps = keep_counts(prune, PATCH_NUMS)
    tokens = [pn * pn if k is None else k for pn, k in zip(PATCH_NUMS, keeps)]
    T = len(var.blocks) * sum(tokens[:-1]) + tokens[-1]
    assert seen == [sampler.kv_cache_bytes(B, prune=prune)] == [2 * 2 * B * var.C * 4 * T]
    assert sampler.kv_cache_bytes(B, prune=prune) < sampler.kv_cache_bytes(B)
    code, seen = CoDeSampler(var, var, draft_steps=2), []
    _cache_bytes(code.drafter_stage, seen)
    _cache_bytes(code.refiner_stage, seen)
    code.sample(B, LABELS, prune=prune, **KW)
    expected = code.kv_cache_bytes(B, prune=prune)
    assert seen == [expected["drafter"], expected["refiner"]]
    refiner_tokens = [pn * pn for pn in PATCH_NUMS[:2]] + tokens[2:]
    assert expected["refiner"] == 2 * 2 * B * var.C * 4 * (len(var.blocks) * sum(refiner_tokens[:-1]) + tokens[-1])
