"""``python -m varcore info`` (and the ``varcore`` console script)."""
import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser(prog="varcore", description="varcore command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="torch build, compiled parts and each op's backend")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    if args.command == "info":
        from varcore._ext import info

        report = info(print_report=not args.json)
        if args.json:
            print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
