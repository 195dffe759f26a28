"""LlamaGen/PAR GPT: configs and keys against the spec, RoPE and mask structure, cached inference against teacher
forcing, the sampler (step counts, orders, reproducibility), checkpoint loading, training, bad arguments."""
import math

import pytest
import torch

from varcore.checkpoints import load_gpt
from varcore.models.gpt import GPT_models, ModelArgs, Transformer, apply_rotary_emb, generate, \
    precompute_freqs_cis_2d
from varcore.ops.attention import par_visible_end, visible_end_mask
from varcore.ops.par_order import par_scatter
from varcore.sampling.par import PARSampler, num_steps, to_uint8, top_k_top_p_filtering
from varcore.train.gpt_trainer import GPTTrainer, to_par_order
from varcore.train.var_trainer import TrainConfig
from tiny_gpt import one_thread, tiny  # noqa: F401  (one_thread is an autouse fixture)

# spec code_par_llamagen.md B.7: (FFN hidden, approximate parameter count) of the LlamaGen c2i models
SPEC_CONFIGS = {"GPT-B": (2048, 111e6), "GPT-L": (2816, 343e6), "GPT-XL": (3584, 775e6),
                "GPT-XXL": (4096, 1.41e9), "GPT-XXXL": (6912, 3.9e9), "GPT-1B": (5632, 1.2e9),
                "GPT-3B": (8704, 3.1e9), "GPT-7B": (11008, 6.6e9)}


def meta_model(name, M=1, block_size=576):
    with torch.device("meta"):
        return GPT_models[name](block_size=block_size, spe_token_num=M * M - 1, ar_token_num=M * M)


# ---------------------------------------------------------------------------------------------- configs and keys
@pytest.mark.parametrize("name", sorted(SPEC_CONFIGS))
def test_config_sizes_match_the_spec(name):
    hidden, approx = SPEC_CONFIGS[name]
    model = meta_model(name)
    dim, n_layer = model.config.dim, model.n_layer
    assert model.layers[0].feed_forward.w1.weight.shape == (hidden, dim)
    count = sum(p.numel() for p in model.parameters())
    # independent count: per layer wqkv + wo + 3 FFN matrices + 2 norms; embeddings, null class, norm, head
    expected = n_layer * (4 * dim * dim + 3 * dim * hidden + 2 * dim) + 2 * 16384 * dim + 1001 * dim + dim
    assert count == expected
    assert abs(count - approx) / approx < 0.03
    par = meta_model(name, M=2)
    assert sum(p.numel() for p in par.parameters()) - count == 3 * dim  # PAR adds (M^2 - 1) * dim


def test_state_dict_keys_match_the_official_names():
    model = meta_model("GPT-B", M=4)
    per_layer = ["attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                 "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"]
    expected = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight", "norm.weight", "output.weight",
                "spe_tok_embeddings.special_embeddings.weight"} | {
        f"layers.{i}.{k}" for i in range(12) for k in per_layer}
    state = model.state_dict()
    assert set(state) == expected
    assert state["spe_tok_embeddings.special_embeddings.weight"].shape == (15, 768)
    assert state["layers.0.attention.wqkv.weight"].shape == (3 * 768, 768)
    assert "spe_tok_embeddings.special_embeddings.weight" not in meta_model("GPT-B", M=1).state_dict()


# ---------------------------------------------------------------------------------------------- RoPE and masks
@pytest.mark.parametrize("G,M,head_dim", [(8, 2, 16), (12, 4, 8), (6, 1, 100)])
def test_rope_table_layout(G, M, head_dim):
    n, R = M * M, G // M
    table = precompute_freqs_cis_2d(G, head_dim, 10000, 1, n - 1, n)
    assert table.shape == (1 + G * G + n - 1, head_dim // 2, 2)
    zero_rows = [0] + list(range(n + 1, 2 * n))
    assert all(table[r].abs().max() == 0 for r in zero_rows)
    # every real token at PAR index p (spec formula p = ((b R + d) M + a) M + e) has the RoPE of its own cell
    freqs = [10000 ** (-2 * i / (head_dim // 2)) for i in range(head_dim // 4)]
    for a in range(M):
        for b in range(R):
            for e in range(M):
                for d in range(R):
                    p = ((b * R + d) * M + a) * M + e
                    row = 1 + p if p < n else p + n
                    r, c = a * R + b, e * R + d
                    angles = torch.tensor([r * f for f in freqs] + [c * f for f in freqs], dtype=torch.float64)
                    torch.testing.assert_close(table[row, :, 0].double(), angles.cos(), atol=1e-5, rtol=0)
                    torch.testing.assert_close(table[row, :, 1].double(), angles.sin(), atol=1e-5, rtol=0)


def test_zero_rope_rows_zero_the_vectors():
    table = precompute_freqs_cis_2d(4, 8, 10000, 1, 3, 4)[:8]
    x = torch.randn(2, 8, 3, 8)
    out = apply_rotary_emb(x, table)
    assert out[:, [0, 5, 6, 7]].abs().max() == 0
    assert torch.allclose(out[:, 1:5].norm(dim=-1), x[:, 1:5].norm(dim=-1), atol=1e-5)  # rotations keep norms


@pytest.mark.parametrize("M,L", [(1, 16), (2, 16), (2, 64), (4, 64)])
def test_group_mask_matches_the_spec(M, L):
    n = M * M
    S = L + n - 1
    spec = torch.tril(torch.ones(S, S, dtype=torch.bool))
    spec[:, 0] = True
    for i in range(S):  # block i covers [n + i n, n + (i + 1) n) and sees everything before its end
        start, end = n + i * n, n + (i + 1) * n
        spec[start:end, :end] = True
    assert torch.equal(visible_end_mask(par_visible_end(S, M), S), spec)


def test_model_attention_follows_the_mask():
    """Changing one input token changes exactly the outputs whose queries can see its position."""
    model = tiny(M=2, grid=4)
    idx = torch.randint(0, 16, (1, 15))
    labels = torch.tensor([1])
    with torch.no_grad():
        base = model.forward_teacher(idx, labels)
        S = 1 + 15 + 3
        mask = visible_end_mask(par_visible_end(S, 2), S)
        for j in (0, 3, 4, 9):  # token j of idx sits at sequence position 1 + j (+3 after the transition tokens)
            pos = 1 + j if j < 4 else 1 + j + 3
            moved = idx.clone()
            moved[0, j] = (moved[0, j] + 1) % 16
            changed = (model.forward_teacher(moved, labels) - base).abs().amax(-1)[0] > 1e-6
            assert torch.equal(changed, mask[:16, pos]), f"token {j}"


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("M", [1, 2, 4])
def test_cached_steps_match_teacher_forcing(M):
    """The official cached-inference path (prefill, single steps, transition step, group steps) gives the
    teacher-forced logits of the same tokens."""
    model = tiny(M=M, grid=8)
    z = torch.randint(0, 16, (2, 64))
    labels = torch.tensor([0, 3])
    n = M * M
    with torch.no_grad():
        ref, _ = model(idx=z[:, :-1], cond_idx=labels)
        model.setup_caches(2, 65, torch.float32)
        got = [model(None, labels, input_pos=torch.tensor([0]))[0]]
        for i in range(n - 1):
            got.append(model(z[:, i:i + 1], None, input_pos=torch.tensor([i + 1]))[0])
        feed = z[:, :n]  # the transition step embeds only its last token
        for g in range(64 // n - 1):
            pos = torch.arange(n + g * n, 2 * n + g * n)
            got.append(model(feed, None, input_pos=pos)[0])
            feed = z[:, n + g * n:2 * n + g * n]
        model.clear_caches()
    torch.testing.assert_close(torch.cat(got, dim=1), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M,steps", [(1, 576), (2, 147), (4, 51)])
def test_sampler_step_counts(M, steps, monkeypatch):
    model = tiny(M=M, grid=24, dim=16, n_layer=1)
    calls = []
    original = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda h, start: calls.append(h.shape[1]) or original(h, start))
    sampler = PARSampler(model)
    assert sampler.steps == num_steps(576, M) == steps
    tokens = sampler.sample_tokens([1], cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (1, 24, 24)
    assert len(calls) == steps and sum(calls) == 576  # positions 0 .. L-1, each fed once


def test_par_and_raster_orders_and_generate():
    model = tiny(M=2, grid=8)
    labels = torch.tensor([2, 0, 1])
    sampler = PARSampler(model)
    kw = dict(cfg_scale=2.0, top_k=5, temperature=0.8)
    par = sampler.sample_tokens(labels, order="par", generator=torch.Generator().manual_seed(7), **kw)
    raster = sampler.sample_tokens(labels, generator=torch.Generator().manual_seed(7), **kw)
    assert par.shape == (3, 64) and raster.shape == (3, 8, 8)
    assert torch.equal(par_scatter(par, 2), raster)
    assert torch.equal(to_par_order(raster, 2), par)
    torch.manual_seed(7)
    assert torch.equal(generate(model, labels, 64, cfg_scale=2.0, top_k=5, temperature=0.8).long(), par)
    other = sampler.sample_tokens(labels, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(other, raster)


def test_images_through_the_vq_tokenizer():
    from varcore.models.vq16 import ModelArgs as VQArgs, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQArgs(codebook_size=16, codebook_embed_dim=8, z_channels=32, ch=32, encoder_ch_mult=[1, 2],
                        decoder_ch_mult=[1, 2], num_res_blocks=1)).eval()
    sampler = PARSampler(tiny(M=2, grid=4), vq=vq)
    tokens = sampler.sample_tokens([1, 3], generator=torch.Generator().manual_seed(3))
    images = sampler.sample([1, 3], generator=torch.Generator().manual_seed(3))
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images, vq.decode_code(tokens.view(2, -1), (2, 8, 4, 4)))
    resized = sampler.sample([1, 3], generator=torch.Generator().manual_seed(3), image_size=6)
    torch.testing.assert_close(resized, torch.nn.functional.interpolate(images, size=(6, 6), mode="bicubic"))
    pixels = to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4))
    assert pixels.shape == (1, 1, 4, 3) and pixels[0, 0, :, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("cfg_interval", [-1, 1, 6])
def test_cfg_interval_follows_the_official_counters(cfg_interval, monkeypatch):
    """Prefill always guided; single-token step i (0 .. n-2) and parallel step i (0, n, 2n, ...) are guided
    unless cfg_interval > -1 and i > cfg_interval (two separate counters, as in the official loops)."""
    model = tiny(M=2, grid=8)
    sampler = PARSampler(model)

    def fake_cached(h, start):  # conditional half 0, unconditional half 1: guided logits are 1 - cfg_scale
        B2, n = h.shape[:2]
        return torch.cat([torch.zeros(B2 // 2, n, 16), torch.ones(B2 // 2, n, 16)])

    seen = []
    original = sampler.step_logits
    monkeypatch.setattr(model, "forward_cached", fake_cached)
    monkeypatch.setattr(sampler, "step_logits", lambda *a: seen.append(original(*a)[0, 0, 0].item()) or
                        original(*a))
    sampler.sample_tokens([1], cfg_scale=3.0, cfg_interval=cfg_interval)

    def on(i):
        return not (cfg_interval > -1 and i > cfg_interval)

    expected = [True] + [on(i) for i in range(3)] + [on(i) for i in range(0, 60, 4)]
    assert [v == -2.0 for v in seen] == expected
    assert all(v in (-2.0, 0.0) for v in seen)


def test_greedy_decoding_is_deterministic_and_model_mode_is_restored():
    model = tiny(M=2, grid=8).train()
    sampler = PARSampler(model)
    a = sampler.sample_tokens([1, 2], cfg_scale=1.5, sample_logits=False)
    b = sampler.sample_tokens([1, 2], cfg_scale=1.5, sample_logits=False)
    assert torch.equal(a, b) and model.training
    assert model.layers[0].attention.kv_cache is None


def test_top_k_top_p_filtering():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
    kept = top_k_top_p_filtering(logits.clone(), top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True], [True, True, True, False]]  # ties at the k-th stay
    probs = logits.softmax(-1)
    kept = top_k_top_p_filtering(logits.clone(), top_p=0.7).isfinite()
    for row, p in zip(kept, probs):  # the smallest top set whose mass exceeds 0.7
        order = p.argsort(descending=True)
        need = int((p[order].cumsum(0) > 0.7).nonzero()[0]) + 1
        assert set(row.nonzero().flatten().tolist()) == set(order[:need].tolist())


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("wrapper", [None, "model", "module", "state_dict"])
def test_load_gpt_layouts(tmp_path, wrapper):
    model = tiny(M=2, grid=4, dim=64, n_head=2)
    state = model.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(state if wrapper is None else {wrapper: state, "steps": 3}, path)
    loaded = load_gpt(path, block_size=16, n_head=2)
    assert loaded.M == 2 and all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())


def test_load_gpt_llamagen_layout_and_mismatch(tmp_path):
    raster = tiny(M=1, grid=4, dim=64, n_head=2)
    loaded = load_gpt(raster.state_dict(), block_size=16, n_head=2)
    assert loaded.M == 1 and not hasattr(loaded, "spe_tok_embeddings")
    with pytest.raises(ValueError, match="n_head"):
        load_gpt(raster.state_dict(), block_size=16)
    with pytest.raises(ValueError, match="missing keys"):
        state = tiny(M=2, grid=4, dim=64).state_dict()
        state.pop("norm.weight")
        load_gpt(state, block_size=16, n_head=2)


# ---------------------------------------------------------------------------------------------- training
def test_overfit_a_few_grids_then_sample_them_back():
    """Training reorders to PAR order; greedy sampling (raster output) must give back the training grids."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layer=2, n_head=2, vocab_size=16, block_size=16, num_classes=4,
                                  spe_token_num=3, ar_token_num=4, token_dropout_p=0.0, resid_dropout_p=0.0,
                                  ffn_dropout_p=0.0, class_dropout_prob=0.1))
    model.cls_embedding.dropout_prob = 0.0
    grids = torch.randint(0, 16, (4, 4, 4))
    labels = torch.arange(4)
    trainer = GPTTrainer(model, TrainConfig(max_iters=200, lr=1e-2, weight_decay=0.0, grad_clip=1.0, wpe=1.0))
    first = trainer.train_step(labels, grids)["loss"]
    for _ in range(199):
        metrics = trainer.train_step(labels, grids)
    assert metrics["loss"] < 0.05 * first and trainer.eval_step(labels, grids)["acc"] == 100.0
    out = PARSampler(model).sample_tokens(labels, cfg_scale=1.0, sample_logits=False)
    assert torch.equal(out, grids)


def test_trainer_checkpoint_round_trip(tmp_path):
    model = tiny(M=2, grid=4)
    trainer = GPTTrainer(model, TrainConfig(max_iters=5, lr=1e-3))
    grids, labels = torch.randint(0, 16, (2, 16)), torch.tensor([0, 1])
    trainer.train_step(labels, grids)
    trainer.save_checkpoint(tmp_path / "ck.pt")
    resumed = GPTTrainer(tiny(M=2, grid=4, seed=1), TrainConfig(max_iters=5, lr=1e-3))
    resumed.load_checkpoint(tmp_path / "ck.pt")
    assert resumed.it == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.model.state_dict().values()))
    assert load_gpt(tmp_path / "ck.pt", block_size=16, n_head=2).M == 2


# ---------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(ar_token_num=32, spe_token_num=31), ValueError, "ar_token_num"),
    (dict(spe_token_num=-1), ValueError, "spe_token_num"),
    (dict(block_size=15), ValueError, "block_size"),
    (dict(model_type="t2i"), ValueError, "model_type"),
    (dict(cls_token_num=120), ValueError, "cls_token_num"),
    (dict(n_head=3), ValueError, "n_head"),
    (dict(dim=64.0), TypeError, "dim"),
    (dict(ar_token_num=16, spe_token_num=15, block_size=36), ValueError, "M=4"),
])
def test_bad_model_args(kwargs, exc, name):
    base = dict(dim=64, n_layer=1, n_head=2, vocab_size=16, block_size=16, num_classes=4)
    base.update(kwargs)
    with pytest.raises(exc, match=name):
        ModelArgs(**base)


def test_bad_sampler_arguments():
    model = tiny(M=2, grid=4)
    with pytest.raises(ValueError, match="M=4"):
        PARSampler(model, M=4)
    with pytest.raises(TypeError, match="model"):
        PARSampler(object())
    sampler = PARSampler(model)
    with pytest.raises(ValueError, match="labels"):
        sampler.sample_tokens([4])
    with pytest.raises(ValueError, match="top_k"):
        sampler.sample_tokens([1], top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        sampler.sample_tokens([1], top_p=1.5)
    with pytest.raises(TypeError, match="temperature"):
        sampler.sample_tokens([1], temperature="hot")
    with pytest.raises(ValueError, match="order"):
        sampler.sample_tokens([1], order="zigzag")
    with pytest.raises(ValueError, match="vq"):
        sampler.sample([1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.tensor([1]), 15)
    with pytest.raises(ValueError, match="spe_token_num"):
        generate(model, torch.tensor([1]), 16, ar_token_num=16, spe_token_num=15)
    with pytest.raises(TypeError, match="idx"):
        model(idx=torch.zeros(1, 15), cond_idx=torch.tensor([1]))
    with pytest.raises(ValueError, match="input_pos"):
        model(None, torch.tensor([1]))


@pytest.mark.slow
def test_training_entry_point(tmp_path):
    from varcore.train.gpt_trainer import main

    grids = torch.randint(0, 16, (4, 16))
    torch.save({"idx_BL": grids, "labels": torch.tensor([0, 1, 2, 3])}, tmp_path / "codes.pt")
    argv = ["--tokens", str(tmp_path / "codes.pt"), "--model", "GPT-B", "--M", "2", "--grid", "4", "--vocab-size",
            "16", "--num-classes", "4", "--iters", "2", "--bs", "2", "--workers", "0", "--out", str(tmp_path / "run"),
            "--no-progress", "--device", "cpu"]
    history = main(argv)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert main(argv) == []  # resumes at step 2 of 2
    assert load_gpt(tmp_path / "run" / "ckpt-last.pt", block_size=16).M == 2
