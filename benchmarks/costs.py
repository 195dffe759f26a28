"""Costs: the FLOPs of each model from its configuration, this machine's ceilings (fp32 and bf16 GEMM throughput,
memory bandwidth) and GPU floors per image. Every benchmark takes its FLOP counts and ceilings from here.

* **Ceilings** are measured in the same run as the benchmarks they are compared with: a square GEMM and the
  (tokens x C) @ (C x 4C) shape of a transformer's linears, in fp32 and bf16, and the bandwidth of a large
  ``copy_`` (read + write) and of an ``add`` (two reads + one write), on arrays far larger than the caches.
* **Floors**: the time one image needs at least on a GPU, from the model's FLOPs (worked out from the architecture
  on the meta device, decoder included) and the card's peak dense bf16 tensor throughput, and from reading the
  weights once per forward pass at its memory bandwidth (which dominates small-batch raster decoding).

    python benchmarks/costs.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, machine_header, print_header, print_table  # noqa: E402

# Peak dense bf16 tensor-core throughput (FLOP/s) and memory bandwidth (bytes/s) from the vendors' data sheets.
GPUS = {
    "A100-SXM4-80GB": (312e12, 2.039e12),
    "H100-SXM5": (989e12, 3.35e12),
}


# ---------------------------------------------------------------------------------------------- measured ceilings
def gemm_gflops(dtype: torch.dtype, m: int, k: int, n: int, repeats: int) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    t = bench(f"gemm {m}x{k}x{n} {dtype}", lambda: a @ b, warmup=2, repeats=repeats, memory=False)
    return 2 * m * k * n / (t.median_ms * 1e-3) / 1e9


def bandwidth_gbs(n_floats: int, repeats: int) -> dict:
    """GB/s of ``y.copy_(x)`` (2 arrays touched) and ``torch.add(x, y, out=z)`` (3 arrays) on float32 arrays."""
    x, y, z = torch.rand(n_floats), torch.rand(n_floats), torch.empty(n_floats)
    copy = bench("copy", lambda: y.copy_(x), warmup=2, repeats=repeats, memory=False)
    add = bench("add", lambda: torch.add(x, y, out=z), warmup=2, repeats=repeats, memory=False)
    nbytes = n_floats * 4
    return {"copy": 2 * nbytes / copy.median_ms / 1e6, "add": 3 * nbytes / add.median_ms / 1e6}


def measure_ceilings(quick: bool = False) -> dict:
    """fp32/bf16 GEMM GFLOP/s (the best of a square and a linear-layer shape) and memory GB/s (the best of copy
    and add), with every individual figure."""
    n = 1024 if quick else 2048
    repeats = 5 if quick else 10
    gemm = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        gemm[name] = {f"{n}^3": gemm_gflops(dtype, n, n, n, repeats),
                      f"{4 * n}x{n // 2}x{2 * n}": gemm_gflops(dtype, 4 * n, n // 2, 2 * n, repeats)}
    bw = bandwidth_gbs((8 if quick else 32) * 2**20, repeats)
    return {"gemm_gflops": gemm, "bandwidth_gbs": bw,
            "fp32_gflops": max(gemm["float32"].values()), "bf16_gflops": max(gemm["bfloat16"].values()),
            "mem_gbs": max(bw.values())}


# ---------------------------------------------------------------------------------------------- model FLOPs
def var_run_flops(var, B: int = 1, *, prune=None, cfg_skip: int = 0, start: int = 0, stop=None,
                  exact: bool = True) -> dict:
    """The FLOP model of one ``VARSampler`` run on B images with the accelerators ``prune`` and ``cfg_skip`` (as
    ``VARSampler.sample`` takes them), over scales ``start .. stop - 1`` (default all), from the configuration.

    Per scale (``"scales"``, in order, one dict each): ``rows`` of the batch (2B with guidance, B at the last
    ``cfg_skip`` scales), ``tokens`` run through the blocks (``keep_counts(prune)``, else pn^2), ``keys`` the
    cached positions they attend over, and the FLOPs (2 per multiply-add) of

    * ``linear``: every block's qkv, proj, fc1 and fc2 on rows x tokens;
    * ``attention``: every block's q.k and p.v, 2 * 2 * C per visible (query, key) pair and row;
    * ``head``: the head on every token of the scale (pruned or not) for both halves in float32 (``exact``), for
      the conditional half where CFG is mixed before it (``exact=False``) or the scale is unguided;
    * ``embed``: the word embedding of the scale's next-scale input (B rows; scale 0 has none).

    A run from ``start > 0`` (CoDe's refiner) begins with one prefill pass over scales ``0 .. start``: the drafted
    scales unpruned, without head, block-causal (a query sees the keys up to the end of its scale), with the rows
    of scale ``start``. ``"conditioning"``: the AdaLN linears computed once per call (every block's and the head's,
    2B rows). The sampling itself (filters, softmax, draw), pruning's scoring and restoring and the quantiser are
    not FLOPs of this model. ``"total"`` sums everything.
    """
    from varcore.sampling.var import keep_counts

    patch_nums = tuple(var.patch_nums)
    SN = len(patch_nums)
    stop = SN if stop is None else stop
    C, V, Cvae, depth = var.C, var.V, var.Cvae, len(var.blocks)
    H = var.blocks[0].ffn.fc1.out_features
    keeps = keep_counts(prune, patch_nums)
    per_token = depth * 2 * (3 * C * C + C * C + 2 * C * H)
    scales, pos = [], 0
    for si in range(stop):
        pn2 = patch_nums[si] ** 2
        in_prefill = si < start
        guided_si = (start if in_prefill else si) < SN - cfg_skip
        rows = 2 * B if guided_si else B
        tokens = pn2 if in_prefill or keeps[si] is None else keeps[si]
        keys = pos + tokens
        pos = keys
        head_rows = rows if exact else B
        entry = {"si": si, "rows": rows, "tokens": tokens, "keys": keys,
                 "linear": rows * tokens * per_token,
                 "attention": depth * 2 * 2 * C * rows * tokens * keys,
                 "head": 0 if in_prefill else 2 * head_rows * pn2 * C * V,
                 "embed": 2 * B * pn2 * Cvae * C if si > 0 else 0}
        scales.append(entry)
    conditioning = 2 * 2 * B * var.D * (6 * C * depth + 2 * C)
    total = conditioning + sum(e["linear"] + e["attention"] + e["head"] + e["embed"] for e in scales)
    return {"scales": scales, "conditioning": conditioning, "total": total,
            "start": start, "stop": stop}


def code_call_flops(drafter, refiner, draft_steps: int, B: int = 1, *, prune=None, cfg_skip: int = 0,
                    exact: bool = True) -> dict:
    """The FLOP model of one ``CoDeSampler`` call: the drafter's run over scales ``0 .. N - 1`` and the refiner's
    run from N (its prefill over the drafted scales, then the rest), each as :func:`var_run_flops` gives it."""
    d = var_run_flops(drafter, B, prune=prune, cfg_skip=cfg_skip, stop=draft_steps, exact=exact)
    r = var_run_flops(refiner, B, prune=prune, cfg_skip=cfg_skip, start=draft_steps, exact=exact)
    return {"drafter": d, "refiner": r, "total": d["total"] + r["total"]}


def flops_per_image(var, start: int = 0, stop=None, head: bool = True) -> float:
    """Forward FLOPs of one image (both CFG halves) over scales ``start .. stop - 1`` (default all) of a plain
    float32 run (:func:`var_run_flops`): block linears, attention and the head (``head=False`` leaves it out, for a
    prefill whose logits are not used). The VQVAE decode is timed separately."""
    scales = var_run_flops(var, 1, stop=stop)["scales"][start:]
    return float(sum(e["linear"] + e["attention"] + head * e["head"] for e in scales))


def _decoder_flops(run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def var_image_cost(name: str) -> dict:
    """FLOPs of one VAR image with CFG (transformer: both halves of every scale; VQVAE decoder), the parameter
    bytes in bf16 and the forward passes, for a released config (``d16`` .. ``d36``), on the meta device."""
    from varcore.models import VAR_CONFIGS

    vae, var = VAR_CONFIGS[name].build(torch.device("meta"))
    pn = var.patch_nums[-1]
    decode = _decoder_flops(lambda: vae.fhat_to_img(torch.empty(1, var.Cvae, pn, pn, device="meta")))
    params = sum(p.numel() for p in var.parameters())
    return {"model": f"VAR-{name}", "px": VAR_CONFIGS[name].resolution, "passes": len(var.patch_nums),
            "transformer_flops": flops_per_image(var), "decoder_flops": decode, "weight_bytes": 2 * params}


def gpt_image_cost(name: str, grid: int = 24, M: int = 1) -> dict:
    """FLOPs of one LlamaGen/PAR image with CFG (every generated token: the linears, attention over its prefix and
    the head; both CFG halves) and the VQ-16 decoder, bf16 parameter bytes and forward passes for ``M`` x ``M``
    parallel decoding (M=1: raster)."""
    from varcore.models.gpt import GPT_CONFIGS, ModelArgs
    from varcore.models.vq16 import VQ_16
    from varcore.sampling.par import num_steps

    n_layer, n_head, dim = GPT_CONFIGS[name]
    args = ModelArgs(n_layer=n_layer, n_head=n_head, dim=dim, vocab_size=16384, block_size=grid * grid,
                     ar_token_num=M * M, spe_token_num=M * M - 1)
    kv_dim = dim * (args.n_kv_head or n_head) // n_head
    per_token_linear = 2 * (dim * dim + 2 * dim * kv_dim + dim * dim + 3 * dim * args.ffn_hidden)
    L = grid * grid
    # token t (0-based) attends to the class token and t earlier tokens: q.k and p.v, 2 * 2 * dim FLOPs each
    attention = sum(n_layer * 4 * dim * (t + 1) for t in range(L))
    flops = 2 * (L * (n_layer * per_token_linear + 2 * dim * args.vocab_size) + attention)
    with torch.device("meta"):
        vq = VQ_16()
    decode = _decoder_flops(lambda: vq.decode_code(torch.zeros(1, L, dtype=torch.long, device="meta"),
                                                   (1, 8, grid, grid)))
    params = (n_layer * (per_token_linear // 2) + 2 * dim * args.vocab_size)  # linears, embedding + head
    return {"model": f"{'LlamaGen' if M == 1 else f'PAR-{M * M}x'}-{name[4:]}", "px": 16 * grid,
            "passes": num_steps(L, M), "transformer_flops": flops, "decoder_flops": decode,
            "weight_bytes": 2 * params}


def code_image_cost(draft_steps: int) -> dict:
    """FLOPs of one CoDe image (CoDe's released pairs: a VAR-d30 drafter for the first ``draft_steps`` scales, a
    VAR-d16 refiner prefilling those and drawing the rest; VQVAE decoder), bf16 bytes of both models, passes."""
    from varcore.models import VAR_CONFIGS

    vae, drafter = VAR_CONFIGS["d30"].build(torch.device("meta"))
    _, refiner = VAR_CONFIGS["d16"].build(torch.device("meta"))
    pn = drafter.patch_nums[-1]
    decode = _decoder_flops(lambda: vae.fhat_to_img(torch.empty(1, drafter.Cvae, pn, pn, device="meta")))
    flops = (flops_per_image(drafter, 0, draft_steps) + flops_per_image(refiner, 0, draft_steps, head=False)
             + flops_per_image(refiner, draft_steps))
    params = sum(p.numel() for m in (drafter, refiner) for p in m.parameters())
    # passes: the refiner's prefill and scale N are one pass
    return {"model": f"CoDe N={draft_steps}", "px": 256, "passes": len(drafter.patch_nums),
            "transformer_flops": flops, "decoder_flops": decode, "weight_bytes": 2 * params}


def _preset_cost(preset) -> dict:
    """The cost of one image of an official FID protocol (:mod:`varcore.presets`)."""
    if preset.family == "var":
        return var_image_cost(preset.name[len("var-"):])
    if preset.family == "code":
        return code_image_cost(int(preset.name[len("code-"):]))
    size = preset.name.split("-")[1].upper()
    M = {"4x": 2, "16x": 4}[preset.name.split("-")[2]] if preset.family == "par" else 1
    return gpt_image_cost(f"GPT-{size}", preset.sample_size // 16, M)


def fid_run_hours(utilisation: float = 0.3, batch: int = 64, images: int = 50_000) -> list:
    """Per FID preset: hours of a 50,000-image run on one GPU of :data:`GPUS`, designed from the FLOP counts: the
    floor per image at ``batch`` (the larger of compute at peak and reading the weights once per pass) over
    ``utilisation``, the assumed share of the peak a bf16 sampler reaches. A design figure, not a measurement."""
    from varcore.presets import PRESETS

    rows = []
    for preset in PRESETS.values():
        c = _preset_cost(preset)
        total = c["transformer_flops"] + c["decoder_flops"]
        row = {"preset": preset.name, "model": c["model"], "px": c["px"], "passes": c["passes"],
               "TFLOP_img": total / 1e12}
        for gpu, (peak, bw) in GPUS.items():
            floor_s = max(total / peak, c["passes"] * c["weight_bytes"] / bw / batch)
            row[f"{gpu} h"] = images * floor_s / utilisation / 3600
        rows.append(row)
    return rows


FID_COLUMNS = ["preset", "model", "px", "passes", "TFLOP_img"] + [f"{g} h" for g in GPUS]


def gpu_floors(batch_sizes=(1, 64)) -> list:
    """Per model and card: the compute floor per image (FLOPs / peak) and, per batch size, the floor per image
    including reading the bf16 weights once per forward pass (KV-cache traffic left out: a lower bound)."""
    costs = [var_image_cost(n) for n in ("d16", "d20", "d24", "d30")] + [
        gpt_image_cost("GPT-XL", 24, M) for M in (1, 2, 4)]
    rows = []
    for c in costs:
        total = c["transformer_flops"] + c["decoder_flops"]
        row = {"model": c["model"], "px": c["px"], "passes": c["passes"], "TFLOP_img": total / 1e12,
               "transformer_TFLOP": c["transformer_flops"] / 1e12, "decoder_TFLOP": c["decoder_flops"] / 1e12,
               "weights_GB": c["weight_bytes"] / 1e9}
        for gpu, (peak, bw) in GPUS.items():
            compute_ms = total / peak * 1e3
            row[f"{gpu} compute ms"] = compute_ms
            for B in batch_sizes:
                weights_ms = c["passes"] * c["weight_bytes"] / bw * 1e3 / B
                row[f"{gpu} B={B} ms"] = max(compute_ms, weights_ms)
        rows.append(row)
    return rows


FLOOR_COLUMNS = ["model", "px", "passes", "TFLOP_img", "weights_GB"] + [
    f"{g} {k}" for g in GPUS for k in ("compute ms", "B=1 ms", "B=64 ms")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller GEMMs and arrays")
    args = parser.parse_args()
    header = machine_header()
    print_header("machine ceilings", header)
    c = measure_ceilings(args.quick)
    print_table([{"ceiling": f"GEMM {k} {s}", "value": v} for k, d in c["gemm_gflops"].items() for s, v in d.items()]
                + [{"ceiling": f"memory {k} GB/s", "value": v} for k, v in c["bandwidth_gbs"].items()],
                ["ceiling", "value"])
    print("\n# GPU floor per image (ms) with CFG, bf16 peak; B = batch (weights read once per pass)")
    print_table(gpu_floors(), FLOOR_COLUMNS)
    print("\n# 50,000-image FID run per preset on one GPU (hours): the B=64 floor at 30% of the bf16 peak (design)")
    print_table(fid_run_hours(), FID_COLUMNS)


if __name__ == "__main__":
    main()
