"""varcore eval: quality and speed of the bundled digits models on this machine (see varcore.digits.evaluate and
docs/digits.md). --json prints a JSON list of objects with the keys model, decoding, steps, images_per_s,
class_consistency (a fraction in [0, 1]) and frechet. Needs scikit-learn: pip install 'varcore[digits]'."""
import argparse

from varcore.argtypes import device_arg

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    from varcore.digits import bundled_names

    p = sub.add_parser("eval", help="class consistency, Fréchet distance and images/s of the bundled models",
                       description=__doc__)
    p.add_argument("--json", action="store_true", help="print the rows as JSON (progress bars go to stderr)")
    p.add_argument("--models", nargs="+", choices=bundled_names(), default=None,
                   help="models to evaluate (default: all)")
    p.add_argument("--per-class", type=int, default=50, help="images per class and model (default 50)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler call (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="read the weights from DIR (e.g. the output of varcore train-digits --out DIR) instead of the package")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from varcore.digits.evaluate import evaluate, format_table, reference_scores, to_json

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
