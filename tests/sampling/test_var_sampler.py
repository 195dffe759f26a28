"""VARSampler: the same tokens as the drop-in ``autoregressive_infer_cfg`` in float32, options, memory, seeding."""
import warnings

import pytest
import torch

from conftest import load_expected, load_var_small
from varcore.models import VAR, VQVAE
from varcore.sampling.draw import top_k_top_p_filter_
from varcore.sampling.var import StaticKVCache, VARSampler, row_chunks


def _build(depth=2, width=64, heads=2, V=64, patch_nums=(1, 2, 3, 4), shared_aln=False, attn_l2_norm=True,
           seed=0):
    """A random-weight VAR whose weights all matter (the official init makes the AdaLN and head nearly zero)."""
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=V, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=patch_nums,
                ch_mult=(1, 1))  # 2x downsampling: decoding costs little
    var = VAR(vae, num_classes=10, depth=depth, embed_dim=width, num_heads=heads, shared_aln=shared_aln,
              attn_l2_norm=attn_l2_norm, patch_nums=patch_nums)
    with torch.no_grad():
        for p in var.parameters():
            p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5)
        if attn_l2_norm:
            for b in var.blocks:
                b.attn.scale_mul_1H11.fill_(1.4)
    return var.eval()


MODELS = {
    "tiny": dict(),
    "shared_aln": dict(depth=3, width=96, heads=3, shared_aln=True, patch_nums=(1, 2, 4, 5)),
    "no_l2_norm": dict(depth=2, width=128, heads=4, V=128, attn_l2_norm=False, patch_nums=(1, 3, 4)),
}
SAMPLING = [
    dict(cfg=1.5),
    dict(cfg=4.0, top_k=10, top_p=0.9),
    dict(cfg=2.0, top_p=0.7),
    dict(cfg=3.0, top_k=5, more_smooth=True),
]


@pytest.fixture(scope="module")
def models():
    return {name: _build(**kw) for name, kw in MODELS.items()}


def _tokens_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kwargs", SAMPLING, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("B", [1, 4, 16])
def test_same_tokens_and_images_as_drop_in(models, name, kwargs, B):
    var = models[name]
    labels = torch.arange(B) % 10
    img_ref, idx_ref = var.autoregressive_infer_cfg(B, labels, g_seed=B + 7, return_idx_Bl=True, **kwargs)
    img = VARSampler(var).sample(B, labels, g_seed=B + 7, **kwargs)
    idx = VARSampler(var).sample(B, labels, g_seed=B + 7, output="tokens", **kwargs)
    assert _tokens_equal(idx, idx_ref)
    assert torch.equal(img, img_ref)


@pytest.mark.parametrize("label_B", [None, 3, -1])
def test_label_forms_and_global_rng(models, label_B):
    var = models["tiny"]
    torch.manual_seed(11)
    _, ref = var.autoregressive_infer_cfg(4, label_B, g_seed=None, cfg=2.0, top_k=8, return_idx_Bl=True)
    torch.manual_seed(11)
    assert _tokens_equal(VARSampler(var).sample(4, label_B, cfg=2.0, top_k=8, output="tokens"), ref)


@pytest.fixture(scope="module")
def golden_var(golden_dir):
    _, var, cfg = load_var_small(golden_dir)
    return var, cfg, load_expected(golden_dir / "var-small")


@pytest.mark.parametrize("i", [0, 1])
def test_golden_official_tokens(golden_var, i):
    var, cfg, expected = golden_var
    idx = VARSampler(var).sample(cfg["config"]["B"], expected["labels"], output="tokens", **cfg["samples"][i])
    assert _tokens_equal(idx, expected[f"sample{i}_idx_Bl"])


@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("i", [0, 1])
def test_golden_model_matches_drop_in(golden_var, B, i):
    var, cfg, _ = golden_var
    kwargs = dict(cfg["samples"][i], more_smooth=bool(i))
    _, ref = var.autoregressive_infer_cfg(B, None, return_idx_Bl=True, **kwargs)
    assert _tokens_equal(VARSampler(var).sample(B, None, output="tokens", **kwargs), ref)


def test_sync_free_draw_is_torch_multinomial():
    """The sampler's draw (argmax of p / Exp(1)) consumes the generator exactly like torch.multinomial."""
    probs = torch.randn(300, 97).mul(3).softmax(-1)
    g = torch.Generator().manual_seed(4)
    ref = torch.multinomial(probs, 1, generator=g)[:, 0]
    after_ref = torch.rand(3, generator=g)
    g = torch.Generator().manual_seed(4)
    ours = probs.div(torch.empty(300, 97).exponential_(generator=g)).argmax(-1)
    assert torch.equal(ours, ref)
    assert torch.equal(torch.rand(3, generator=g), after_ref)


@pytest.mark.parametrize("top_k,top_p", [(10, 0.9), (40, 0.5), (3, 0.99)])
def test_low_precision_filter_keeps_the_official_set(top_k, top_p):
    """Top-p over the top-k candidates only (the bf16 mode) keeps the official set."""
    logits = torch.randn(3, 20, 64) * 2
    ref = top_k_top_p_filter_(logits.clone(), top_k=top_k, top_p=top_p)
    ours = logits.clone()
    top_k_top_p_filter_(ours, top_k, top_p, sort_top_k_only=True)
    assert torch.equal(ours.isinf(), ref.isinf())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sampling(models, dtype):
    var = models["shared_aln"]
    labels = torch.arange(4)
    ref = VARSampler(var).sample(4, labels, g_seed=1, top_k=10, top_p=0.9, output="tokens")
    toks = VARSampler(var, dtype=dtype).sample(4, labels, g_seed=1, top_k=10, top_p=0.9, output="tokens")
    assert [t.shape for t in toks] == [t.shape for t in ref]
    assert all(t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < var.V for t in toks)
    # the first scale sees only the class token, so low precision rarely changes it
    assert (toks[0] == ref[0]).float().mean() >= 0.5
    img = VARSampler(var, dtype=dtype).sample(4, labels, g_seed=1)
    assert img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1


def test_per_scale_options(models):
    var = models["tiny"]
    s = VARSampler(var)
    base = s.sample(2, torch.tensor([1, 2]), g_seed=3, top_k=6, output="tokens")
    same = s.sample(2, torch.tensor([1, 2]), g_seed=3, top_k=[6] * 4, temperature=[1.0] * 4, output="tokens")
    assert _tokens_equal(base, same)
    # a hotter last scale changes nothing before it (the draws keep their order)
    hot = s.sample(2, torch.tensor([1, 2]), g_seed=3, top_k=6, temperature=[1.0, 1.0, 1.0, 50.0],
                   output="tokens")
    assert _tokens_equal(hot[:3], base[:3])
    # with top-k 1 every scale is the argmax, whatever the temperature
    greedy = s.sample(2, torch.tensor([1, 2]), g_seed=3, top_k=1, temperature=[0.5, 2.0, 3.0, 9.0],
                      output="tokens")
    assert _tokens_equal(greedy, s.sample(2, torch.tensor([1, 2]), g_seed=8, top_k=1, output="tokens"))


def test_output_both_and_chunked_decode(models):
    var = models["shared_aln"]
    labels = torch.arange(5)
    img, toks = VARSampler(var).sample(5, labels, g_seed=4, output="both")
    assert _tokens_equal(toks, VARSampler(var).sample(5, labels, g_seed=4, output="tokens"))
    chunked, toks2 = VARSampler(var, decode_batch=2).sample(5, labels, g_seed=4, output="both")
    assert _tokens_equal(toks2, toks)
    torch.testing.assert_close(chunked, img, atol=1e-5, rtol=0)


def test_batch_invariant_seeds(models):
    var = models["shared_aln"]
    s = VARSampler(var)
    labels = torch.tensor([3, 1, 4, 1])
    batch = s.sample(4, labels, seeds=[10, 11, 12, 13], output="tokens")
    for i in (0, 2):
        alone = s.sample(1, labels[i:i + 1], seeds=[10 + i], output="tokens")
        assert _tokens_equal(alone, [t[i:i + 1] for t in batch])
    assert _tokens_equal(s.sample(4, labels, g_seed=10, per_image_seeds=True, output="tokens"), batch)
    # labels drawn per image too
    drawn = s.sample(2, None, seeds=[5, 6], output="tokens")
    assert _tokens_equal(s.sample(1, None, seeds=[6], output="tokens"), [t[1:] for t in drawn])
    # the default stays official (shared generator), which differs from per-image seeding
    assert not _tokens_equal(s.sample(4, labels, g_seed=10, output="tokens"), batch)


def test_generator_argument(models):
    var = models["tiny"]
    _, ref = var.autoregressive_infer_cfg(3, 2, g_seed=9, return_idx_Bl=True)
    gen = torch.Generator().manual_seed(9)
    assert _tokens_equal(VARSampler(var).sample(3, 2, generator=gen, output="tokens"), ref)


def test_kv_cache_memory(models):
    var = models["shared_aln"]
    s = VARSampler(var)
    B = 3
    cache = StaticKVCache(var.depth, 2 * B, s.heads, s.head_dim, var.patch_nums, torch.float32, "cpu")
    assert cache.nbytes == s.kv_cache_bytes(B)
    assert s.kv_cache_bytes(B) < s.concat_kv_cache_bytes(B)
    P = var.L - var.patch_nums[-1] ** 2
    assert s.kv_cache_bytes(B) == 2 * 2 * B * var.C * 4 * (var.depth * P + var.patch_nums[-1] ** 2)
    assert VARSampler(var, dtype=torch.bfloat16).kv_cache_bytes(B) * 2 == s.kv_cache_bytes(B)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("min_rows", [8, 20, None], ids=["blocks8", "blocks20", "no_block_chunks"])
@pytest.mark.parametrize("draw_rows", [1, 7])
@pytest.mark.parametrize("kwargs", [dict(cfg=2.0, top_k=10, top_p=0.8), dict(cfg=3.0, top_k=5, more_smooth=True)],
                         ids=["top_k_top_p", "more_smooth"])
def test_row_chunked_blocks_and_draws_keep_the_tokens(models, name, min_rows, draw_rows, kwargs, monkeypatch):
    """Blocks run over batch-row chunks and draws over token-row chunks (forced here on small shapes) give
    exactly the drop-in tokens and images.

    Tiny GEMMs are not row-independent in this BLAS (the sampler never chunks below 2048 rows, see the next
    test), so with block chunks forced onto them the float32 logits may move in the last bit: the tokens must
    still agree, and the images too where the tokens alone decide them (not with ``more_smooth``)."""
    import varcore.sampling.var as sampler_mod
    var, B = models[name], 16
    labels = torch.arange(B) % 10
    img_ref, ref = var.autoregressive_infer_cfg(B, labels, g_seed=5, return_idx_Bl=True, **kwargs)  # unchunked
    monkeypatch.setattr(sampler_mod, "_DRAW_CHUNK_BYTES", 4 * var.V * draw_rows)
    seen = []
    if min_rows is not None:
        monkeypatch.setattr(sampler_mod, "_CHUNK_BYTES", 1)
        monkeypatch.setattr(sampler_mod, "_MIN_CHUNK_ROWS", min_rows)
    monkeypatch.setattr(sampler_mod, "row_chunks", lambda *a: seen.append(row_chunks(*a)) or seen[-1])
    img, idx = VARSampler(var).sample(B, labels, g_seed=5, output="both", **kwargs)
    assert _tokens_equal(idx, ref)
    if min_rows is None or not kwargs.get("more_smooth"):
        assert torch.equal(img, img_ref)
    else:
        torch.testing.assert_close(img, img_ref, rtol=0, atol=1e-4)
    if min_rows is not None:
        assert max(len(c) for c in seen) > 2  # the largest scales really ran in chunks
    for chunks in seen:  # the chunks tile the 2B rows in order
        assert [r for c in chunks for r in range(2 * B)[c]] == list(range(2 * B))


def test_gemm_rows_are_independent_above_the_chunk_minimum():
    """What row chunking relies on: a float32 linear over n >= _MIN_CHUNK_ROWS rows gives each row the bits it
    gets in a larger batch (true for this machine's BLAS at the d16..d30 widths; checked here at d16's)."""
    from varcore.sampling.var import _MIN_CHUNK_ROWS
    torch.manual_seed(0)
    for K, N in [(1024, 4096), (4096, 1024)]:
        x, w, b = torch.randn(2 * _MIN_CHUNK_ROWS, K), torch.randn(N, K), torch.randn(N)
        full = torch.nn.functional.linear(x, w, b)
        assert torch.equal(torch.cat([torch.nn.functional.linear(c, w, b) for c in x.split(_MIN_CHUNK_ROWS)]), full)


def test_row_chunks_bound_the_ffn_activations():
    # d16 (C = 1024), batch 32 with CFG at the 16x16 scale: a 256 MiB FFN hidden -> four chunks of 64 MiB
    assert [c.stop - c.start for c in row_chunks(64, 256, 1024, 4)] == [16, 16, 16, 16]
    assert [c.stop - c.start for c in row_chunks(64, 100, 1024, 4)] == [32, 32]  # 100 MiB
    assert row_chunks(64, 256, 1024, 2) != row_chunks(64, 256, 1024, 4)  # bfloat16 halves the bytes
    assert row_chunks(16, 256, 1024, 4) == [slice(None)]  # 64 MiB: one chunk
    assert row_chunks(64, 16, 1024, 4) == [slice(None)]  # under the minimum GEMM rows per chunk
    assert [c.stop - c.start for c in row_chunks(7, 4096, 1024, 4)] == [1] * 7  # never more chunks than rows


def test_progress_bar(models, capsys):
    VARSampler(models["tiny"]).sample(1, 0, g_seed=0, progress=True, output="tokens")
    assert "VAR scales" in capsys.readouterr().err


def test_cuda_graphs_fall_back_on_cpu(models):
    var = models["tiny"]
    with pytest.warns(UserWarning, match="cuda_graphs"):
        s = VARSampler(var, cuda_graphs=True)
    _, ref = var.autoregressive_infer_cfg(2, 1, g_seed=2, return_idx_Bl=True)
    assert _tokens_equal(s.sample(2, 1, g_seed=2, output="tokens"), ref)


def test_failed_graph_capture_falls_back(models):
    """A capture that fails (here: no GPU) warns once and the call finishes eagerly with the official tokens."""
    var = models["tiny"]
    s = VARSampler(var)
    s.cuda_graphs = True  # as if built on CUDA: buffers kept per batch size, capture attempted on first use
    _, ref = var.autoregressive_infer_cfg(2, 1, g_seed=2, more_smooth=True, return_idx_Bl=True)
    with pytest.warns(UserWarning, match="capture failed"):
        toks = s.sample(2, 1, g_seed=2, more_smooth=True, output="tokens")
    assert _tokens_equal(toks, ref)
    assert not s.cuda_graphs


def test_graph_key_holds_shapes_only(models):
    """CUDA graphs are keyed by what changes shapes or buffers, so new sampling settings reuse the graphs."""
    s = VARSampler(models["tiny"])
    labels = torch.tensor([1, 2])
    state = s.call_state(labels)
    keys = {s.graph_key(o, state) for kw in (dict(cfg=1.5), dict(cfg=4.0, top_k=5, top_p=0.9, temperature=0.7))
            for o in s.options(more_smooth=False, **{"top_k": 0, "top_p": 0.0, "temperature": 1.0, **kw})}
    assert keys == {((2, 0, s.SN), si, False, True, None, None, None, None, False) for si in range(s.SN)}
    skipped = s.options(1.5, 0, 0.0, 1.0, False, cfg_skip=1)[-1]
    assert s.graph_key(skipped, state) != s.graph_key(s.options(1.5, 0, 0.0, 1.0, False)[-1], state)
    pruned = s.options(1.5, 0, 0.0, 1.0, False, prune={s.SN - 1: 0.5})[-1]  # fewer tokens: other shapes
    assert s.graph_key(pruned, state) != s.graph_key(s.options(1.5, 0, 0.0, 1.0, False)[-1], state)
    assert s.graph_key(s.options(1.5, 0, 0.0, 1.0, False)[0], s.call_state(torch.tensor([1, 2, 3])))[0][0] == 3


def test_compiled_step_has_no_graph_breaks(models):
    """The per-scale step traces with fullgraph=True (aot_eager keeps the ops, so the tokens stay exact)."""
    var = models["tiny"]
    s = VARSampler(var, compile={"backend": "aot_eager"})
    _, ref = var.autoregressive_infer_cfg(2, 1, g_seed=2, top_k=5, top_p=0.9, more_smooth=True, return_idx_Bl=True)
    toks = s.sample(2, 1, g_seed=2, top_k=5, top_p=0.9, more_smooth=True, output="tokens")
    assert _tokens_equal(toks, ref)


def test_compiled_inverse_cdf_draw_has_no_graph_breaks(models):
    """The inverse-CDF draw (cumulative sum, search) traces with fullgraph=True too, to the eager tokens."""
    var = models["tiny"]
    kw = dict(g_seed=2, top_k=5, top_p=0.9, draw="inverse_cdf", output="tokens")
    toks = VARSampler(var, compile={"backend": "aot_eager"}).sample(2, 1, **kw)
    assert _tokens_equal(toks, VARSampler(var).sample(2, 1, **kw))


@pytest.mark.slow
def test_inductor_compiled_sampler(models):
    var = models["tiny"]
    toks = VARSampler(var, compile=True).sample(2, 1, g_seed=2, output="tokens")
    ref = VARSampler(var).sample(2, 1, g_seed=2, output="tokens")
    agree = sum(int((a == b).sum()) for a, b in zip(toks, ref)) / sum(t.numel() for t in ref)
    assert agree > 0.5


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(B=0), ValueError, "B must be"),
    (dict(B=2.0), TypeError, "B must be"),
    (dict(cfg="1"), TypeError, "cfg"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=[1, 2]), ValueError, "top_k .*one value per scale"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=[0.5] * 5), ValueError, "top_p"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(output="pixels"), ValueError, "output"),
    (dict(more_smooth=1), TypeError, "more_smooth"),
    (dict(g_seed=1.5), TypeError, "g_seed"),
    (dict(per_image_seeds=True), ValueError, "per_image_seeds"),
    (dict(seeds=[1]), ValueError, "seeds"),
    (dict(seeds=[1, 2], g_seed=3), ValueError, "seeds"),
    (dict(generator=torch.Generator(), g_seed=1), ValueError, "generator"),
    (dict(generator=3), TypeError, "generator"),
    (dict(label_B=11), ValueError, "label_B"),
])
def test_bad_arguments(models, kwargs, err, match):
    call = dict(B=2, label_B=1)
    call.update(kwargs)
    with pytest.raises(err, match=match):
        VARSampler(models["tiny"]).sample(**call)


def test_bad_constructor_arguments(models):
    with pytest.raises(TypeError, match="var"):
        VARSampler(object())
    with pytest.raises(ValueError, match="dtype"):
        VARSampler(models["tiny"], dtype=torch.float64)
    with pytest.raises(TypeError, match="compile"):
        VARSampler(models["tiny"], compile="yes")
    with pytest.raises(ValueError, match="decode_batch"):
        VARSampler(models["tiny"], decode_batch=0)


def test_lazy_export(models):
    import varcore

    assert varcore.VARSampler is VARSampler
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(VARSampler(models["tiny"]), VARSampler)
