"""The training-free accelerators of the bundled models as compact configuration strings (``varcore eval --accel``).

Grammar (no spaces)::

    CONFIG  := MODEL [ ":" OPTION { "," OPTION } ]
    OPTION  := KEY "=" VALUE

``MODEL`` is a bundled name (:data:`varcore.digits.BUNDLED`); each ``KEY`` appears at most once. The keys:

* the sampler options of :data:`ACCEL_OPTIONS` (passed through :meth:`varcore.digits.DigitsSampler.sample` to the
  model's sampler), each for the families its entry names:

  - ``cfg_skip=K`` (VAR, CoDe): the last K scales without guidance, an int in ``[0, scales - 1]``;
  - ``prune=SI:R[+SI:R ...]`` (VAR, CoDe): FastVAR token pruning, scale ``SI`` keeps the fraction ``R`` in
    (0, 1] of its tokens; a negative ``SI`` counts from the last scale (``-1`` is the last), so one string prunes
    the last scales of models with different schedules;
  - ``kv_budget=SI:R[+SI:R ...]`` (VAR, CoDe): KV-cache compression, after scale ``SI`` every block keeps the
    fraction ``R`` of the keys written so far (the ones its observation window attends to most); ``SI`` as for
    ``prune`` (``-2`` is the last scale whose keys are read again);
  - ``sjd=W`` (PAR, raster): speculative Jacobi decoding with windows of up to W steps (the model's distribution in
    fewer forward passes);
  - ``draft_steps=N`` (CoDe): the drafter draws the first N scales and the refiner the others (default: the
    model's own split);
  - ``draw=inverse_cdf`` (every family): each token drawn from the same distribution by inverting its CDF at one
    uniform instead of the official draw's one exponential per code (``draw=multinomial``, the default);

* ``vs=MODEL``: the bundled model the configuration is measured against (default: the same model with no options),
  e.g. ``digits-code:vs=digits-var`` measures CoDe's drafter/refiner split against the drafter alone.

Examples: ``digits-var:prune=3:0.5,cfg_skip=1``, ``digits-code:cfg_skip=1``, ``digits-var:prune=-2:0.5+-1:0.5``,
``digits-par:vs=digits-raster``, ``digits-raster:sjd=8``,
``digits-code8:draft_steps=3,prune=-1:0.5,draw=inverse_cdf``.

A new sampler option plugs in as one entry of :data:`ACCEL_OPTIONS`: its families, how its text parses, the accepted
form (for the error messages), whether it changes the KV cache (then the harness passes it to the sampler's
``kv_cache_bytes`` as well) and whether it is a parameter of the sampler's construction instead of its calls.
Syntax, unknown keys and options of another family are refused here with a ValueError that names the
configuration, the key or value and what is allowed; ranges that depend on the model (scale counts) are the
samplers' own checks, run by the harness before it measures anything.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from varcore.sampling.draw import DRAWS

__all__ = ["AccelOption", "ACCEL_OPTIONS", "AccelConfig", "parse_config", "parse_options", "bind_options",
           "accel_options", "option_names", "BASELINE_KEY"]

BASELINE_KEY = "vs"


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an int") from None


def _parse_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # NaN fails this too
        raise ValueError(f"the keep ratio {text} is not in (0, 1]")
    return value


def _parse_draw(text: str) -> str:
    if text not in DRAWS:
        raise ValueError(f"{text!r} is not one of {', '.join(DRAWS)}")
    return text


def _parse_scale_ratios(text: str) -> Dict[int, float]:
    ratios: Dict[int, float] = {}
    for item in text.split("+"):
        si, colon, ratio = item.partition(":")
        if not colon:
            raise ValueError(f"{item!r} is not SI:R")
        try:
            index = int(si)
        except ValueError:
            raise ValueError(f"the scale index {si!r} is not an int") from None
        if index in ratios:
            raise ValueError(f"scale {index} is given twice")
        ratios[index] = _parse_ratio(ratio)
    return ratios


def _bind_scale_ratios(ratios: Dict[int, float], scales: int) -> Dict[int, float]:
    """Negative scale indices counted from the last scale (index ``scales + SI``); others as they are."""
    bound: Dict[int, float] = {}
    for si, ratio in ratios.items():
        index = scales + si if -scales <= si < 0 else si
        if index in bound:
            raise ValueError(f"two indices name scale {index} (of scales 0..{scales - 1})")
        bound[index] = ratio
    return bound


@dataclass(frozen=True)
class AccelOption:
    """One sampler option of the configuration grammar.

    ``families``: the bundled families ('var', 'code', 'gpt') whose samplers take it; ``parse``: its value text to
    the sampler's value (ValueError saying what is wrong); ``form``: the accepted text, for messages and help;
    ``kv``: it changes the KV cache, so the harness passes it to ``kv_cache_bytes`` too; ``build``: it is a
    parameter of the sampler's construction, so :class:`~varcore.digits.DigitsSampler` builds (and keeps) a sampler
    per value instead of passing it to the calls; ``bind``: the parsed value made concrete for a model of
    ``scales`` scales (or decoding steps) before it reaches the sampler."""

    families: Tuple[str, ...]
    parse: Callable[[str], Any]
    form: str
    help: str
    kv: bool = False
    build: bool = False
    bind: Callable[[Any, int], Any] = field(default=lambda value, scales: value)


ACCEL_OPTIONS: Dict[str, AccelOption] = {
    "cfg_skip": AccelOption(("var", "code"), _parse_int, "K (an int in [0, scales - 1])",
                            "the last K scales run without guidance (half their rows)"),
    "prune": AccelOption(("var", "code"), _parse_scale_ratios,
                         "SI:R[+SI:R...] (R in (0, 1]; SI < 0 counts from the last scale)",
                         "FastVAR token pruning: scale SI runs the fraction R of its tokens through the blocks",
                         kv=True, bind=_bind_scale_ratios),
    "kv_budget": AccelOption(("var", "code"), _parse_scale_ratios,
                             "SI:R[+SI:R...] (R in (0, 1]; SI < 0 counts from the last scale, which is never "
                             "compressed)",
                             "KV-cache compression: after scale SI every block keeps the fraction R of the keys "
                             "written so far, those its observation window attends to most",
                             kv=True, bind=_bind_scale_ratios),
    "sjd": AccelOption(("gpt",), _parse_int, "W (an int >= 1: the window in decoding steps)",
                       "speculative Jacobi decoding: windows of up to W steps drafted and verified in one pass"),
    "draft_steps": AccelOption(("code",), _parse_int, "N (an int in [1, scales - 1])",
                               "CoDe's split: the drafter draws the first N scales, the refiner the others",
                               build=True),
    "draw": AccelOption(("var", "code", "gpt"), _parse_draw, "|".join(DRAWS),
                        "how each token is drawn: inverse_cdf takes one uniform per token instead of the official "
                        "multinomial's one exponential per code (the same distribution)"),
}


def option_names(family: str) -> list:
    """The keys a configuration of a model of ``family`` accepts (its sampler options, then ``vs``)."""
    return [k for k, o in ACCEL_OPTIONS.items() if family in o.families] + [BASELINE_KEY]


@dataclass(frozen=True)
class AccelConfig:
    """A parsed configuration: the model, its sampler options (parsed, not yet bound to the model's scales) and the
    baseline model it is measured against."""

    text: str
    model: str
    options: Dict[str, Any]
    baseline: str

    @property
    def is_baseline(self) -> bool:
        """Whether this is its own baseline: the baseline model with no options."""
        return not self.options and self.baseline == self.model


def _allowed(family: str, baseline: bool = True) -> str:
    return "; ".join(f"{k}={ACCEL_OPTIONS[k].form}" if k in ACCEL_OPTIONS else f"{k}=MODEL (a bundled model)"
                     for k in option_names(family) if baseline or k != BASELINE_KEY)


def _parse_items(text: str, family: str, where: str, name: str, baseline: bool) -> Tuple[Dict[str, Any], Any]:
    """The options of the comma-separated ``KEY=VALUE`` items of ``text`` for a model of ``family`` (``name`` in the
    messages, ``where`` first in them), and the value of ``vs=`` where ``baseline`` allows it (else None)."""
    options: Dict[str, Any] = {}
    vs, seen = None, set()
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"{where}: {item!r} is not KEY=VALUE (keys of {name}: {_allowed(family, baseline)})")
        if key in seen:
            raise ValueError(f"{where}: {key} is given twice")
        seen.add(key)
        if key == BASELINE_KEY and baseline:
            vs = value
            continue
        option = ACCEL_OPTIONS.get(key)
        if option is None or family not in option.families:
            what = "an unknown key" if option is None else f"not an option of {name} (a {family} model)"
            raise ValueError(f"{where}: {key!r} is {what}; the keys of {name}: {_allowed(family, baseline)}")
        try:
            options[key] = option.parse(value)
        except ValueError as e:
            raise ValueError(f"{where}: {key}={value!r}: {e}; expected {key}={option.form}") from None
    return options, vs


def parse_options(text: str, family: str, where: str = "--accel") -> Dict[str, Any]:
    """The sampler options ``KEY=VALUE[,KEY=VALUE...]`` (a configuration's part after ``MODEL:``, without ``vs``)
    for a model of ``family`` ('var', 'code' or 'gpt'), parsed but not bound (:func:`bind_options`); ValueError
    starting with ``where`` and naming the bad part and the allowed keys."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}")
    return _parse_items(text, family, where, f"a {family} model", baseline=False)[0]


def bind_options(options: Dict[str, Any], scales: int) -> Dict[str, Any]:
    """Parsed options as the sampler of a model of ``scales`` scales (or decoding steps) takes them (negative scale
    indices resolved, :attr:`AccelOption.bind`)."""
    return {k: ACCEL_OPTIONS[k].bind(v, scales) for k, v in options.items()}


def accel_options(text: Optional[str], family: str, scales: int, where: str = "--accel") -> Dict[str, Any]:
    """A command line's ``--accel`` text as the sampler of a ``family`` model of ``scales`` scales (or decoding
    steps) takes it (:func:`parse_options`, then :func:`bind_options`); empty for None (the flag not given)."""
    return {} if text is None else bind_options(parse_options(text, family, where), scales)


def parse_config(text: str) -> AccelConfig:
    """Parse one configuration string (grammar in the module docstring); ValueError naming the bad part."""
    from varcore.digits import BUNDLED, bundled_names

    if not isinstance(text, str):
        raise TypeError(f"an accel config must be a str, got {type(text).__name__}")
    model, colon, rest = text.partition(":")
    if model not in BUNDLED:
        raise ValueError(f"accel config {text!r}: the model {model!r} is not one of {bundled_names()}")
    options, vs = _parse_items(rest, BUNDLED[model].family, f"accel config {text!r}", model, baseline=True) \
        if colon else ({}, None)
    if vs is not None and vs not in BUNDLED:
        raise ValueError(f"accel config {text!r}: vs={vs!r} is not one of {bundled_names()}")
    return AccelConfig(text, model, options, model if vs is None else vs)
