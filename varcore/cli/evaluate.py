"""varcore eval: quality and speed of the bundled digits models on this machine (see varcore.digits.evaluate and
docs/digits.md). --json prints a JSON list of objects with the keys model, decoding, steps, images_per_s,
class_consistency (a fraction in [0, 1]) and frechet. Needs scikit-learn: pip install 'varcore[digits]'.

--accel CONFIG [CONFIG ...] prices training-free accelerators instead: CONFIG is MODEL[:KEY=VALUE[,KEY=VALUE...]]
with the keys cfg_skip=K (VAR, CoDe: the last K scales unguided), prune=SI:R[+SI:R...] (VAR, CoDe: scale SI keeps
the fraction R of its tokens; SI < 0 counts from the last scale), kv_budget=SI:R[+SI:R...] (VAR, CoDe: after scale SI
every block keeps the fraction R of the keys written so far), sjd=W (GPTs: speculative Jacobi decoding, windows of W
steps), draft_steps=N (CoDe: the drafter draws the first N scales), draw=multinomial|inverse_cdf (every model:
inverse_cdf draws each token from the same distribution with one uniform instead of one exponential per code) and
vs=MODEL (the baseline; default the same model without options), e.g. digits-var:prune=3:0.5,cfg_skip=1 or
digits-code:cfg_skip=1,vs=digits-var. Each config is sampled alternately with its baseline, batch for batch, and
gives one row: images/s, forward passes per batch, KV bytes, class consistency, Fréchet distance, the baseline's
and the ratios (--json: the keys config, model, options, decoding, images_per_s, forward_passes, kv_bytes,
class_consistency, frechet, baseline, vs_baseline). --sweep runs the fixed list varcore.digits.evaluate.SWEEP."""
import argparse

from varcore.argtypes import device_arg

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    from varcore.digits import bundled_names

    p = sub.add_parser("eval", help="class consistency, Fréchet distance and images/s of the bundled models",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the rows as JSON (progress bars go to stderr)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--models", nargs="+", choices=bundled_names(), default=None,
                      help="models to evaluate (default: all)")
    what.add_argument("--accel", nargs="+", type=accel_config_arg, metavar="CONFIG",
                      help="accelerator configurations, each against its baseline (see above)")
    what.add_argument("--sweep", action="store_true", help="the fixed accelerator sweep (varcore.digits.evaluate."
                                                           "SWEEP), as --accel")
    p.add_argument("--per-class", type=int, default=50, help="images per class and model (default 50)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler call (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="read the weights from DIR (e.g. the output of varcore train-digits --out DIR) instead of "
                        "the package")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def accel_config_arg(text: str):
    """An accelerator configuration (varcore.digits.accel.parse_config), refused with argparse's one-line error."""
    from varcore.digits.accel import parse_config

    try:
        return parse_config(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_accel(args, configs) -> int:
    from varcore.digits.evaluate import accel_to_json, evaluate_accel, format_accel_table

    rows = evaluate_accel(configs, per_class=args.per_class, batch_size=args.batch_size, seed=args.seed,
                          device=args.device, weights_root=args.weights, progress=not args.no_progress)
    if args.json:
        print(accel_to_json(rows))
        return 0
    print(format_accel_table(rows))
    print(f"\n{args.per_class} images per class and configuration; each configuration and its baseline drew the "
          f"same labels and seeds in alternating batches of {args.batch_size}; images/s is the median over the "
          f"batches after the first, x baseline its ratio to the baseline's in the same run.")
    return 0


def run(args) -> int:
    from varcore.digits.evaluate import SWEEP, evaluate, format_table, reference_scores, to_json

    if args.accel or args.sweep:
        return run_accel(args, args.accel or list(SWEEP))
    rows = evaluate(args.models, per_class=args.per_class, batch_size=args.batch_size, seed=args.seed,
                    device=args.device, weights_root=args.weights, progress=not args.no_progress)
    if args.json:
        print(to_json(rows))
        return 0
    print(format_table(rows))
    ref = reference_scores(weights_root=args.weights)
    print(f"\nreal test digits: class consistency {100 * ref['class_consistency']:.1f}%, Fréchet train vs test "
          f"{ref['frechet']:.1f}; {args.per_class} images per class and model, images/s is the median over "
          f"batches of {args.batch_size} after one warm-up batch (this machine may be busy).")
    return 0
