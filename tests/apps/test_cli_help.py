"""Help texts of the command lines are plain text: no reST markup in descriptions, epilogs or option help."""
import argparse
import re

import pytest

from varcore import sample_ddp
from varcore.__main__ import build_parser
from varcore.digits import training

# ``literal``, :role:`target`, `interpreted text`, *emphasis* and **strong**, .. directives
REST_MARKUP = re.compile(r"``|:[a-z]+:`|`[^`\s][^`]*`|(?<![\w*])\*{1,2}[^\s*][^*]*\*{1,2}(?![\w*])|^\s*\.\. ",
                         re.MULTILINE)


def _varcore_parsers():
    parser = build_parser()
    yield "varcore", parser
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        yield f"varcore {name}", p


PARSERS = dict(_varcore_parsers())
PARSERS["sample_ddp"] = sample_ddp.build_arg_parser()
PARSERS["python -m varcore.digits.training"] = training.build_arg_parser()


def test_every_subcommand_is_checked():
    assert {"varcore info", "varcore sample", "varcore eval", "varcore bench", "varcore presets",
            "varcore train-digits", "varcore probe"} <= set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_has_no_rest_markup(name):
    text = PARSERS[name].format_help()
    assert "usage:" in text
    found = sorted({m.group(0).strip() for m in REST_MARKUP.finditer(text)})
    assert not found, f"{name} --help has reST markup {found}:\n{text}"


@pytest.mark.parametrize("text, markup", [
    ("see ``--out``", True), ("see :mod:`varcore.probe`", True), ("the `varcore presets` list", True),
    ("an *emphasised* word", True), ("a **strong** word", True), (".. note:: x", True),
    ("1.1 x 7, a*b, 2 * 3 * 4, '--args'", False), ("bench_*.py and run_*.json", False),
])
def test_the_markup_pattern(text, markup):
    assert bool(REST_MARKUP.search(text)) is markup
