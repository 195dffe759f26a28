"""Two checkouts of varcore side by side: the same sampling workloads, timed in interleaved rounds.

    python benchmarks/bench_versions.py --base /path/to/old/checkout --head . [--cases var code par] [--repeats 3]

Each checkout runs in a worker process of its own (``PYTHONPATH=<checkout>``; both must have their extensions
built in place), which builds every model once from the same seeds and warms every case up with one untimed
call. Then each round times one call of every case in both workers, alternating which goes first, so load from
other processes hits both alike. Reported per case: median wall and CPU seconds per call of each checkout, the
ratio head / base (below 1: the head is faster) and whether both drew the same tokens (same seeds, so the float32
cases must agree exactly).

Cases (random weights, official initialisation, CPU, float32 unless named):

* ``var``: a d16-shaped VAR at 256 px (V=4096), batch 8, cfg 1.5, top-k 900, top-p 0.96: the fast sampler in
  float32 and bfloat16 (tokens only, no decode) and the drop-in ``autoregressive_infer_cfg`` (with its decode).
* ``code``: CoDe with the official depths 30 / 16 at half width, batch 4, N = 6 and 8, tokens only.
* ``par``: a GPT-B-shaped GPT on a 16 x 16 grid, batch 1, cfg 1.5: raster, PAR-4x and PAR-16x in both sampler
  modes (parity and fast), tokens only.
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

CASE_GROUPS = ("var", "code", "par")
# the shapes of the docstring, and tiny ones for a functional check (--quick)
SIZES = {
    "full": dict(var_depth=16, var_ch=160, code_depths=(30, 16), gpt=(12, 12, 768), grid=16),
    "quick": dict(var_depth=4, var_ch=32, code_depths=(6, 4), gpt=(2, 4, 128), grid=8),
}


# ---------------------------------------------------------------------------------------------- the worker
def _build_cases(groups, size):
    """name -> a function drawing one call's tokens, on this process's varcore."""
    import torch

    from varcore.models import PATCH_NUMS, VAR, build_vae_var

    cases = {}
    if "var" in groups:
        from varcore.sampling.var import VARSampler

        torch.manual_seed(0)
        _, var = build_vae_var("cpu", depth=size["var_depth"], V=4096, ch=size["var_ch"], patch_nums=PATCH_NUMS[256])
        var.eval()
        labels, opts = torch.arange(8) * 100, dict(cfg=1.5, top_k=900, top_p=0.96)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            sampler = VARSampler(var, dtype=dtype)
            cases[f"var-fast-{name}-b8"] = (lambda s=sampler, y=labels, o=opts: s.sample(8, y, g_seed=0, output="tokens", **o))
        cases["var-dropin-fp32-b8"] = lambda y=labels, o=opts: var.autoregressive_infer_cfg(
            8, y, g_seed=0, return_idx_Bl=True, **o)[1]
    if "code" in groups:
        from varcore.sampling.code import CoDeSampler

        torch.manual_seed(0)
        vae, _ = build_vae_var("cpu", depth=1, ch=size["var_ch"], patch_nums=PATCH_NUMS[256])

        def half_width(depth):
            heads = round(depth * 0.5)
            model = VAR(vae, depth=depth, embed_dim=64 * heads, num_heads=heads, attn_l2_norm=True,
                        patch_nums=PATCH_NUMS[256])
            model.init_weights(init_std=-1)
            return model.eval()

        drafter, refiner = (half_width(d) for d in size["code_depths"])
        labels, opts = torch.arange(4) * 250, dict(cfg=1.5, top_k=600, top_p=0.96, temperature=[1.1] * 7 + [1.0] * 3)
        for N in (6, 8):
            sampler = CoDeSampler(drafter, refiner, N)
            cases[f"code-N{N}-b4"] = (lambda s=sampler, y=labels, o=opts: s.sample(4, y, g_seed=0, output="tokens", **o))
    if "par" in groups:
        from varcore.models.gpt import ModelArgs, Transformer
        from varcore.sampling.par import PARSampler

        n_layer, n_head, dim = size["gpt"]
        torch.manual_seed(0)
        shared = None
        for sched, M in (("raster", 1), ("par4", 2), ("par16", 4)):
            model = Transformer(ModelArgs(n_layer=n_layer, n_head=n_head, dim=dim, vocab_size=16384,
                                          block_size=size["grid"] ** 2,
                                          spe_token_num=M * M - 1, ar_token_num=M * M))
            if shared is None:
                torch.nn.init.normal_(model.output.weight, std=0.02)  # the official init zeroes the head
                shared = model.state_dict()
            else:
                model.load_state_dict(shared, strict=False)  # everything but the transition tokens
            model.eval()
            for mode in ("parity", "fast"):
                sampler = PARSampler(model, fast=mode == "fast")

                def run(s=sampler):
                    return s.sample_tokens([3], cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
                cases[f"par-{sched}-{mode}"] = run
    return cases


def _digest(tokens) -> str:
    import torch

    parts = tokens if isinstance(tokens, (list, tuple)) else [tokens]
    h = hashlib.sha1()
    for t in parts:
        h.update(t.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def worker(groups, size) -> None:
    """Build the cases, warm each up, then time one call per case name read from stdin (one JSON line back)."""
    import torch

    cases = _build_cases(groups, SIZES[size])
    with torch.no_grad():
        for fn in cases.values():
            fn()
    print(json.dumps({"ready": sorted(cases)}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            tokens = cases[name]()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"case": name, "wall": wall, "cpu": cpu, "tokens": _digest(tokens)}), flush=True)


# ---------------------------------------------------------------------------------------------- the driver
class _Worker:
    def __init__(self, tree: str, groups, threads, size):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", size, "--cases", *groups]
        self.proc = subprocess.Popen(cmd, cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.cases = json.loads(self._read())["ready"]

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a worker stopped (exit status {self.proc.wait()}): see its error above")
        return line

    def time(self, case: str) -> dict:
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=False, help="the checkout to compare against")
    parser.add_argument("--head", default=".", help="the checkout under test (default: this one)")
    parser.add_argument("--cases", nargs="+", choices=CASE_GROUPS, default=list(CASE_GROUPS))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each worker")
    parser.add_argument("--json", default=None, help="write the rows here too")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a functional check, not a measurement")
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.cases, args.size)
    if not args.base:
        parser.error("--base is required")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    size = "quick" if args.quick else "full"
    workers = {side: _Worker(tree, args.cases, args.threads, size) for side, tree in (("base", args.base),
                                                                                       ("head", args.head))}
    if workers["base"].cases != workers["head"].cases:
        raise SystemExit(f"the checkouts built different cases: {workers['base'].cases} / {workers['head'].cases}")
    results = {side: {c: [] for c in workers[side].cases} for side in workers}
    for r in range(args.repeats):
        order = ("base", "head") if r % 2 == 0 else ("head", "base")
        for case in workers["base"].cases:
            for side in order:
                results[side][case].append(workers[side].time(case))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    for w in workers.values():
        w.close()
    rows = []
    for case in workers["base"].cases:
        med = {side: {k: statistics.median(x[k] for x in results[side][case]) for k in ("wall", "cpu")}
               for side in workers}
        same = {x["tokens"] for side in workers for x in results[side][case]}
        rows.append(dict(case=case, base_wall=med["base"]["wall"], head_wall=med["head"]["wall"],
                         ratio_wall=med["head"]["wall"] / med["base"]["wall"], base_cpu=med["base"]["cpu"],
                         head_cpu=med["head"]["cpu"], ratio_cpu=med["head"]["cpu"] / med["base"]["cpu"],
                         same_tokens=len(same) == 1))
    print(f"{'case':22s} {'base s':>8s} {'head s':>8s} {'head/base':>9s} {'cpu h/b':>8s}  same tokens")
    for row in rows:
        print(f"{row['case']:22s} {row['base_wall']:8.2f} {row['head_wall']:8.2f} {row['ratio_wall']:9.3f} "
              f"{row['ratio_cpu']:8.3f}  {'yes' if row['same_tokens'] else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": os.path.abspath(args.base), "head": os.path.abspath(args.head),
                       "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
