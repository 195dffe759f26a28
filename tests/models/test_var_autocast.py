"""VAR and CoDe under ``torch.autocast("cpu", bfloat16 / float16)``: the official modules' op sequence and dtypes, so
the logits, tokens and images equal the official ones bit for bit.

The expected values (``expected_autocast.pt`` in ``var-small`` and ``code-small``) are what the official
FoundationVision/VAR and czg1225/CoDe modules returned on the golden weights inside ``torch.autocast("cpu", ...)``
(see tests/golden/README.md). Facts of the official code behind them: its teacher-forced forward switches off only
CUDA autocast around the embeddings (``torch.cuda.amp.autocast(enabled=False)``), so on the CPU ``word_embed`` runs
in the autocast dtype; CPU autocast leaves ``F.normalize`` in the input's dtype; the training mask is an additive
float mask in the autocast dtype; the VAE's attention multiplies contiguous copies.
"""
import pytest
import torch
import torch.nn.functional as F

import varcore
from conftest import load_code_small, load_expected, load_var_small
from half_gemm import require_recorded_rounding
from varcore.models.basic_var import attention
from varcore.ops.attention import var_visible_end, visible_end_mask

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The GEMM fingerprints (tests/half_gemm.py) of the machine that recorded expected_autocast.pt (AMD EPYC, AVX2).
RECORDED_ROUNDING = {"bfloat16": "13ac799d03823b74", "float16": "3b65ff2295f5c733"}


# ATen's vectorised CPU kernels (softmax, the attention's exp and reductions) are chosen by this capability; in
# float16 their rounding differs between the AVX2 and AVX-512 variants even where the GEMMs agree (a Zen 4 CPU
# with the recording machine's float16 GEMM fingerprint gives other last bits), so the float16 facts need AVX2.
RECORDED_CAPABILITY = {"float16": "AVX2"}


def _require_recorded_rounding(name):
    require_recorded_rounding(DTYPES[name], RECORDED_ROUNDING, "expected_autocast.pt")
    dtype = str(DTYPES[name]).removeprefix("torch.")
    here = torch.backends.cpu.get_cpu_capability()
    if RECORDED_CAPABILITY.get(dtype, here) != here:
        pytest.skip(f"expected_autocast.pt: {dtype} facts recorded with ATen's {RECORDED_CAPABILITY[dtype]} kernels, "
                    f"this CPU runs its {here} ones (set ATEN_CPU_CAPABILITY={RECORDED_CAPABILITY[dtype].lower()} "
                    f"to run them)")


@pytest.fixture(scope="module")
def var_small(golden_dir):
    _, var, cfg = load_var_small(golden_dir)
    folder = golden_dir / "var-small"
    return var, cfg, load_expected(folder), load_expected(folder, "expected_autocast.pt")


def _equal_lists(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_autocast_key_is_checked(var_small):
    _, cfg, _, amp = var_small
    keys = {f"{d}_logits_BLV" for d in DTYPES}
    keys |= {f"{d}_sample{i}_{k}" for d in DTYPES for i in range(len(cfg["samples"])) for k in ("img", "idx_Bl")}
    assert set(amp) == keys


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_forward_under_autocast_equals_official(var_small, name):
    _require_recorded_rounding(name)
    var, _, expected, amp = var_small
    with torch.autocast("cpu", dtype=DTYPES[name]):
        logits = var(expected["labels"], expected["var_input_BLCv"])
    assert logits.dtype == torch.float32
    assert torch.equal(logits, amp[f"{name}_logits_BLV"])
    # the expected values are not the float32 ones: the test tells the precisions apart
    assert not torch.equal(amp[f"{name}_logits_BLV"], expected["logits_BLV"])


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("i", [0, 1])
def test_sampling_under_autocast_equals_official(var_small, name, i):
    _require_recorded_rounding(name)
    var, cfg, expected, amp = var_small
    kw = dict(B=cfg["config"]["B"], label_B=expected["labels"], **cfg["samples"][i])
    with torch.autocast("cpu", dtype=DTYPES[name]):
        img, idx_Bl = var.autoregressive_infer_cfg(return_idx_Bl=True, **kw)
        fast_img, fast_idx = varcore.VARSampler(var).sample(output="both", **kw)
    assert _equal_lists(idx_Bl, amp[f"{name}_sample{i}_idx_Bl"])
    assert img.dtype == DTYPES[name] and torch.equal(img, amp[f"{name}_sample{i}_img"])
    assert _equal_lists(fast_idx, idx_Bl) and torch.equal(fast_img, img)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("patch_nums, heads, c", [((1, 2, 3), 2, 16), ((1, 2, 4, 5), 3, 8)])
def test_masked_attention_under_autocast_is_the_official_sdpa_call(dtype, patch_nums, heads, c):
    """Under autocast the block-causal mask runs as the official additive float mask in SDPA (autocast casts q, k,
    v and the mask to its dtype), not as varcore's kernel."""
    torch.manual_seed(len(patch_nums))
    visible_end = var_visible_end(patch_nums)
    L = int(visible_end[-1])
    q, k, v = (torch.randn(2, heads, L, c) for _ in range(3))
    bias = torch.zeros(()).masked_fill(~visible_end_mask(visible_end, L), -torch.inf).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = attention(q, k, v, visible_end, scale=0.7)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.7)
    assert out.dtype == dtype and torch.equal(out, ref)


# ---------------------------------------------------------------- CoDe
@pytest.fixture(scope="module")
def code_small(golden_dir):
    _, drafter, refiner, cfg = load_code_small(golden_dir)
    folder = golden_dir / "code-small"
    return drafter, refiner, cfg, load_expected(folder), load_expected(folder, "expected_autocast.pt")


def test_every_code_autocast_key_is_checked(code_small):
    *_, amp = code_small
    assert set(amp) == {f"{d}_{k}" for d in DTYPES for k in ("token_hub", "draft_idx_Bl", "img", "refine_idx_Bl")}


def _code_kwargs(cfg, labels):
    run = cfg["runs"][0]
    return run["N"], dict(B=len(labels), label_B=labels, cfg=run["cfg"], top_k=run["top_k"], top_p=run["top_p"],
                          g_seed=run["g_seed"], more_smooth=False, temp=run["temp"])


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_code_tokens_under_autocast_equal_official(code_small, name):
    _require_recorded_rounding(name)
    drafter, refiner, cfg, expected, amp = code_small
    N, kw = _code_kwargs(cfg, expected["labels"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=DTYPES[name]):
        _, hub = drafter.autoregressive_infer_cfg_draft(exit_num=N, **kw)
        tokens = varcore.CoDeSampler(drafter, refiner, N).sample(
            kw["B"], kw["label_B"], g_seed=kw["g_seed"], cfg=kw["cfg"], top_k=kw["top_k"], top_p=kw["top_p"],
            temperature=kw["temp"], output="tokens")
    assert torch.equal(hub, amp[f"{name}_token_hub"])
    assert _equal_lists(tokens, list(amp[f"{name}_draft_idx_Bl"]) + list(amp[f"{name}_refine_idx_Bl"]))


@pytest.mark.slow  # the 256 px decoder in half precision on the CPU: minutes
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_code_images_under_autocast_equal_official(code_small, name):
    _require_recorded_rounding(name)
    drafter, refiner, cfg, expected, amp = code_small
    N, kw = _code_kwargs(cfg, expected["labels"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=DTYPES[name]):
        f_hat, hub = drafter.autoregressive_infer_cfg_draft(exit_num=N, **kw)
        img = refiner.autoregressive_infer_cfg_refine(draft=hub, f_hat=f_hat, entry_num=N, **kw)
    assert img.dtype == DTYPES[name] and torch.equal(img, amp[f"{name}_img"])
