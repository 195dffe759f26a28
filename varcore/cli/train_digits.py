"""``varcore train-digits``: the training recipe of the bundled digits models (:mod:`varcore.digits.training`)."""
import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    from varcore.digits import training as digits

    p = sub.add_parser("train-digits", help="train the bundled digits models on this CPU (minutes)",
                       description=digits.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    digits.add_arguments(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from varcore.digits import training as digits

    return digits.run(args)
