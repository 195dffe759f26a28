"""varcore probe: do the tokens that VAR and PAR draw in parallel depend on each other? (see varcore.probe and
docs/probe.md). On the bundled digits models: (a) for the raster GPT, the mean KL
between its prediction of token j with an earlier token i as drawn and with i resampled, against the Chebyshev
distance of i and j; (b) for the VAR, per scale, the mutual information between neighbouring tokens in real and in
generated token maps, and the entropy of its per-token predictions given the coarser scales. All in nats.
Needs scikit-learn for the real digits: pip install 'varcore[digits]'."""
import argparse
import json

__all__ = ["add_parser", "run", "format_report"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("probe", help="within-scale / within-step token dependency of the bundled models",
                       description=__doc__)
    p.add_argument("--split", default="all", choices=("train", "test", "all"),
                   help="digits whose token maps are the real maps (default all: 1797 images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--permutations", type=int, default=8, help="permutations for the MI bias baseline (default 8)")
    p.add_argument("--gpt-sequences", type=int, default=64, help="sequences the raster GPT draws (default 64)")
    p.add_argument("--gpt-sources", type=int, default=16, help="source positions i per sequence (default 16)")
    p.add_argument("--resamples", type=int, default=2, help="draws of x_i' per source (default 2)")
    p.add_argument("--weights", default=None, metavar="DIR", help="read the weights from DIR instead of the package")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(run=run)
    return p


def format_report(report: dict) -> str:
    """The probe's two tables as text."""
    lines = [f"(b) VAR, per scale: neighbour MI (nats, plug-in minus permutation baseline) in real maps "
             f"({report['split']} digits, {report['n_images']} images) and in maps the VAR draws (unguided), "
             f"plug-in entropy of the scale's tokens, mean entropy of the per-token predictions given coarser scales",
             f"{'scale':>5} {'pn':>3} {'MI real':>8} {'MI gen':>8} {'nMI real':>8} {'nMI gen':>8} {'H tokens':>8} "
             f"{'H pred':>8}"]
    for r in report["var"]:
        def f(key):
            return f"{r[key]:8.3f}" if key in r else f"{'-':>8}"
        lines.append(f"{r['scale']:>5} {r['pn']:>3} {f('real_corrected')} {f('gen_corrected')} {f('real_normalized')} "
                     f"{f('gen_normalized')} {f('h_tokens')} {f('h_pred')}")
    g = report.get("gpt")
    if g:
        lines += ["", f"(a) raster GPT ({g['grid']}x{g['grid']} grid, {g['sequences']} drawn sequences, "
                  f"{g['sources']} sources, {g['resamples']} resamples): mean KL(p(x_j | x) || p(x_j | x, x_i "
                  f"resampled)) by Chebyshev distance d",
                  f"{'d':>3} {'mean KL':>10} {'pairs':>8}"]
        for d, v in g["by_distance"].items():
            lines.append(f"{d:>3} {v:10.5f} {g['count_by_distance'][d]:>8}")
    return "\n".join(lines)


def run(args) -> int:
    from varcore.probe import run_probe

    report = run_probe(split=args.split, seed=args.seed, permutations=args.permutations,
                       gpt_sequences=args.gpt_sequences, gpt_sources=args.gpt_sources, resamples=args.resamples,
                       weights_root=args.weights)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
