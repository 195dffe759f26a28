"""The varcore command line (also python -m varcore): info, sample, eval, bench, probe, presets and train-digits;
varcore COMMAND --help describes each."""
import argparse
import json
import sys

from varcore.cli import bench, evaluate, probe, sample, train_digits


def _run_info(args) -> int:
    from varcore.ops.extension import info

    report = info(print_report=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one error format: ``varcore COMMAND: error: ...`` on one line (the
    subcommands' parsers are of this class too)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _run_presets(args) -> int:
    from varcore.presets import format_presets

    print(format_presets())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="varcore", description="varcore: VAR, CoDe and PAR image generation. "
                                     "Run 'varcore COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_info = sub.add_parser("info", help="torch build, compiled parts and each op's backend",
                            description="Report the torch build, the compiled parts and each op's backend.")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_info.set_defaults(run=_run_info)
    p_presets = sub.add_parser("presets", help="the official FID protocols for python -m varcore.sample_ddp --preset",
                               description="List the official FID sampling protocols (sample_ddp --preset NAME) "
                                           "with their values and the upstream files they come from.")
    p_presets.set_defaults(run=_run_presets)
    for module in (sample, evaluate, bench, train_digits, probe):
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (printed) returns its status; --help exits as argparse does
        if e.code == 0:
            raise
        return e.code
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as e:
        # bad arguments or missing files: a one-line message, not a traceback
        print(f"varcore {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
