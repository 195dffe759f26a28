"""``varcore eval``: sample every bundled model on this machine and score the samples with the quality harness.

For each model, ``per_class`` images of each of the 10 classes are drawn in batches of ``batch_size`` (one seed
per batch, derived from ``seed``). The first batch is a warm-up: images/s is the median over the other batches
(wall-clock, sampling and decoding, one process; the machine may be shared, so compare rows of one run only).
Class consistency and the Fréchet distance (against the held-out test digits) use all images.

:func:`evaluate_accel` (``varcore eval --accel CONFIG ...``, ``--sweep``) prices the training-free accelerators:
each configuration (:mod:`varcore.digits.accel`) is sampled batch for batch alternately with its baseline (the same
model without options, or the ``vs=`` model), on the same labels and seeds, and gives one row with its speed,
forward passes, KV bytes and quality, the baseline's, and their ratios.
"""
import json
import statistics
import time
from typing import Dict, List, Optional, Sequence, Union

import torch
from tqdm import tqdm

from varcore.digits import BUNDLED, DigitsSampler, bundled_names
from varcore.digits.accel import AccelConfig, bind_options, parse_config
from varcore.digits.quality import (class_consistency, classifier_features, frechet_distance, load_classifier,
                                    reference_features)

__all__ = ["evaluate", "format_table", "reference_scores", "EVAL_KEYS", "evaluate_accel", "format_accel_table",
           "accel_to_json", "ACCEL_KEYS", "ACCEL_MEASURES", "SWEEP"]

EVAL_KEYS = ("model", "decoding", "steps", "images_per_s", "class_consistency", "frechet")
# an accel row: the configuration, its measures, the baseline's measures ("baseline": {model, *measures}) and the
# ratios configuration / baseline ("vs_baseline": {*measures}; None where a measure is missing or the base is 0)
ACCEL_MEASURES = ("images_per_s", "forward_passes", "kv_bytes", "class_consistency", "frechet")
ACCEL_KEYS = ("config", "model", "options", "decoding") + ACCEL_MEASURES + ("baseline", "vs_baseline")
# the fixed configurations of --sweep and benchmarks/run_all.py: on the 6-scale VAR each accelerator alone and
# stacked, CoDe (drafter/refiner) against the drafter alone and stacked (with the official and the inverse-CDF
# draw, at the model's split N=4 and at N=3), the small VAR alone; a few on the 4-scale VAR; PAR against raster
# decoding, speculative Jacobi decoding of both GPTs and the raster GPT's inverse-CDF draw
SWEEP = (
    "digits-var:cfg_skip=1",
    "digits-var:prune=-1:0.5",
    "digits-code:vs=digits-var",
    "digits-var8:cfg_skip=2",
    "digits-var8:prune=-2:0.5+-1:0.5",
    "digits-var8:prune=-2:0.5+-1:0.5,cfg_skip=2",
    "digits-var8:kv_budget=3:0.25+4:0.25",
    "digits-var8:kv_budget=2:0.1+3:0.1+4:0.1",
    "digits-var8-small:vs=digits-var8",
    "digits-code8:vs=digits-var8",
    "digits-code8:cfg_skip=2,vs=digits-var8",
    "digits-code8:prune=-2:0.5+-1:0.5,cfg_skip=2,vs=digits-var8",
    "digits-code8:prune=-2:0.5+-1:0.5,cfg_skip=2,kv_budget=2:0.1+3:0.1+4:0.1,vs=digits-var8",
    "digits-var8:draw=inverse_cdf",
    "digits-code8:draw=inverse_cdf,vs=digits-var8",
    "digits-code8:prune=-1:0.25,draw=inverse_cdf,vs=digits-var8",
    "digits-code8:prune=-1:0.5,cfg_skip=1,draw=inverse_cdf,vs=digits-var8",
    "digits-code8:prune=-2:0.75+-1:0.25,cfg_skip=1,draw=inverse_cdf,vs=digits-var8",
    "digits-code8:prune=-2:0.5+-1:0.5,cfg_skip=2,draw=inverse_cdf,vs=digits-var8",
    "digits-code8:draft_steps=3,vs=digits-var8",
    "digits-code8:draft_steps=3,draw=inverse_cdf,vs=digits-var8",
    "digits-code8:draft_steps=3,prune=-1:0.5,draw=inverse_cdf,vs=digits-var8",
    "digits-code8:draft_steps=3,prune=-1:0.5,cfg_skip=1,draw=inverse_cdf,vs=digits-var8",
    "digits-par:vs=digits-raster",
    "digits-raster:sjd=8",
    "digits-raster:sjd=16",
    "digits-par:sjd=8",
    "digits-raster:draw=inverse_cdf",
)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _batches(per_class: int, batch_size: int):
    """The labels (per_class images of each class) and their batches."""
    labels = torch.arange(10).repeat_interleave(per_class)
    return labels, list(labels.split(batch_size))


def _batch_seed(seed: int, i: int) -> int:
    return seed * 100003 + i


def _timed_sample(sampler: DigitsSampler, labels: torch.Tensor, seed: int, cfg: Optional[float] = None, **accel):
    """(images on the CPU, wall-clock seconds per image) of one sampler call."""
    t0 = time.perf_counter()
    img = sampler.sample(labels, seed=seed, cfg=cfg, **accel)
    if img.is_cuda:
        torch.cuda.synchronize()
    return img.cpu(), (time.perf_counter() - t0) / labels.shape[0]


def _images_per_s(seconds: List[float]) -> float:
    timed = seconds[1:] or seconds  # the first batch warms up (allocations, lazy init)
    return 1.0 / statistics.median(timed)


def _quality(classifier, images: torch.Tensor, labels: torch.Tensor, ref_feats: torch.Tensor) -> Dict[str, float]:
    return {"class_consistency": class_consistency(classifier, images, labels),
            "frechet": frechet_distance(classifier_features(classifier, images), ref_feats)}


@torch.no_grad()
def evaluate_model(name: str, classifier, ref_feats: torch.Tensor, per_class: int = 50, batch_size: int = 100,
                   seed: int = 0, device="cpu", weights_root=None, progress: bool = False,
                   cfg: Optional[float] = None) -> Dict:
    """One row of the table for bundled model ``name`` (keys :data:`EVAL_KEYS`)."""
    sampler = DigitsSampler(name, device=device, weights_root=weights_root)
    labels, batches = _batches(per_class, batch_size)
    images, seconds = [], []
    for i, lab in enumerate(tqdm(batches, desc=name, disable=not progress, dynamic_ncols=True, leave=False)):
        img, s = _timed_sample(sampler, lab, _batch_seed(seed, i), cfg)
        seconds.append(s)
        images.append(img)
    return {"model": name, "decoding": sampler.decoding, "steps": int(sampler.steps),
            "images_per_s": _images_per_s(seconds), **_quality(classifier, torch.cat(images), labels, ref_feats)}


def evaluate(names: Optional[Sequence[str]] = None, per_class: int = 50, batch_size: int = 100, seed: int = 0,
             device="cpu", weights_root=None, progress: bool = True) -> List[Dict]:
    """Rows (dicts with the keys :data:`EVAL_KEYS`) for the bundled models ``names`` (default: all)."""
    names = bundled_names() if names is None else list(names)
    unknown = [n for n in names if n not in BUNDLED]
    if unknown or not names:
        raise ValueError(f"names must be a non-empty list of bundled models {bundled_names()}, got {names}")
    _check_count("per_class", per_class)
    _check_count("batch_size", batch_size)
    classifier = load_classifier(device=device, weights_root=weights_root)
    ref = reference_features(classifier, "test")
    return [evaluate_model(n, classifier, ref, per_class, batch_size, seed, device, weights_root, progress)
            for n in names]


def reference_scores(weights_root=None) -> Dict[str, float]:
    """The harness on real digits: the classifier's accuracy on the test split and the Fréchet distance between
    the train and test splits (what a perfect generator would score, up to sample-size bias)."""
    from varcore.digits.data import load_digits

    classifier = load_classifier(weights_root=weights_root)
    x, y = load_digits("test")
    return {"class_consistency": class_consistency(classifier, x.add(1).mul(0.5), y),
            "frechet": frechet_distance(reference_features(classifier, "train"), reference_features(classifier))}


def format_table(rows: List[Dict]) -> str:
    """A fixed-width text table of :func:`evaluate` rows."""
    header = ("model", "decoding", "forward passes", "images/s", "class consistency", "Fréchet")
    cells = [(r["model"], r["decoding"], str(r["steps"]), f"{r['images_per_s']:.0f}",
              f"{100 * r['class_consistency']:.1f}%", f"{r['frechet']:.1f}") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda vals: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def to_json(rows: List[Dict]) -> str:
    return json.dumps([{k: r[k] for k in EVAL_KEYS} for r in rows], indent=2)


# ---------------------------------------------------------------------------------------------- accelerators
class _Run:
    """One measured configuration: a model's sampler with bound accelerator options, and what its batches gave."""

    def __init__(self, sampler: DigitsSampler, options: dict):
        self.sampler, self.options = sampler, options
        self.images: List[torch.Tensor] = []
        self.seconds: List[float] = []
        self.passes: List[int] = []

    def sample(self, labels: torch.Tensor, seed: int) -> None:
        img, s = _timed_sample(self.sampler, labels, seed, **self.options)
        self.images.append(img)
        self.seconds.append(s)
        self.passes.append(self.sampler.forward_passes)

    def measures(self, classifier, labels, ref_feats, B: int) -> Dict:
        passes = statistics.mean(self.passes)
        return {"images_per_s": _images_per_s(self.seconds),
                "forward_passes": int(passes) if passes == int(passes) else passes,
                "kv_bytes": self.sampler.kv_cache_bytes(B, **self.options),
                **_quality(classifier, torch.cat(self.images), labels, ref_feats)}


def _bind(config: AccelConfig, sampler: DigitsSampler) -> dict:
    """The configuration's options as the model's sampler takes them, checked by a one-image call (the samplers'
    own range checks; it also warms the sampler up). ValueError naming the configuration."""
    try:
        options = bind_options(config.options, sampler.scales or sampler.steps)
        sampler.sample([0], seed=0, **options)
    except (ValueError, TypeError) as e:
        raise ValueError(f"accel config {config.text!r}: {e}") from None
    return options


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _run_key(baseline: str, model: str, options: dict) -> str:
    """A run of ``model`` with ``options`` in the group of ``baseline`` (a configuration measured against two
    baselines runs in both groups, interleaved with each)."""
    return json.dumps([baseline, model, options], sort_keys=True, default=str)


@torch.no_grad()
def evaluate_accel(configs: Sequence[Union[str, AccelConfig]], per_class: int = 50, batch_size: int = 100,
                   seed: int = 0, device="cpu", weights_root=None, progress: bool = True) -> List[Dict]:
    """One row (keys :data:`ACCEL_KEYS`) per configuration (strings in the grammar of :mod:`varcore.digits.accel`,
    or parsed :class:`~varcore.digits.accel.AccelConfig`).

    Every configuration and its baseline sample the same labels (``per_class`` of each class) in batches of
    ``batch_size`` with the same seeds as ``varcore eval``. The configurations that share a baseline are measured
    together, interleaved: batch i is drawn by each of them in turn, the order rotating with i, so that load from
    other processes falls on all of them alike; then the next baseline's group. images/s is the median over the
    batches after the first (as :func:`evaluate`); forward passes are the model forward calls per batch
    (:attr:`DigitsSampler.forward_passes`, averaged over the batches where the count varies); KV bytes those of one
    full batch (:meth:`DigitsSampler.kv_cache_bytes` with the options; None for samplers without the count).
    Bad configurations raise ValueError before anything is measured."""
    parsed = [c if isinstance(c, AccelConfig) else parse_config(c) for c in configs]
    if not parsed:
        raise ValueError("configs must be a non-empty list of accel configs")
    _check_count("per_class", per_class)
    _check_count("batch_size", batch_size)
    samplers: Dict[str, DigitsSampler] = {}
    for name in dict.fromkeys(n for c in parsed for n in (c.baseline, c.model)):
        samplers[name] = DigitsSampler(name, device=device, weights_root=weights_root)
    runs: Dict[str, _Run] = {}
    groups: Dict[str, List[str]] = {}  # baseline model -> the keys of its runs, the baseline's first
    row_keys = []
    for c in parsed:
        options = _bind(c, samplers[c.model])
        base_key, key = _run_key(c.baseline, c.baseline, {}), _run_key(c.baseline, c.model, options)
        group = groups.setdefault(c.baseline, [base_key])
        runs.setdefault(base_key, _Run(samplers[c.baseline], {}))
        if key not in runs:
            runs[key] = _Run(samplers[c.model], options)
            group.append(key)
        row_keys.append((c, key, base_key))
    classifier = load_classifier(device=device, weights_root=weights_root)
    ref = reference_features(classifier, "test")
    labels, batches = _batches(per_class, batch_size)
    for baseline, keys in groups.items():
        bar = tqdm(total=len(batches) * len(keys), desc=f"accel vs {baseline}", disable=not progress,
                   dynamic_ncols=True, leave=False)
        with bar:
            for i, lab in enumerate(batches):
                for key in keys[i % len(keys):] + keys[:i % len(keys)]:
                    runs[key].sample(lab, _batch_seed(seed, i))
                    bar.update(1)
    B = batches[0].shape[0]
    measures = {key: run.measures(classifier, labels, ref, B) for key, run in runs.items()}
    rows = []
    for c, key, base_key in row_keys:
        mine, base = measures[key], measures[base_key]
        rows.append({"config": c.text, "model": c.model, "options": runs[key].options,
                     "decoding": samplers[c.model].decoding_for(runs[key].options), **mine,
                     "baseline": {"model": c.baseline, **base},
                     "vs_baseline": {m: _ratio(mine[m], base[m]) for m in ACCEL_MEASURES}})
    return rows


def format_accel_table(rows: List[Dict]) -> str:
    """A fixed-width text table of :func:`evaluate_accel` rows."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = ("config", "baseline", "passes", "KV KiB", "images/s", "x baseline", "class consistency", "baseline",
              "Fréchet", "baseline")
    cells = []
    for r in rows:
        b, q = r["baseline"], r["vs_baseline"]
        kv = None if r["kv_bytes"] is None else r["kv_bytes"] / 1024
        cells.append((r["config"], b["model"], num(r["forward_passes"], "g"), num(kv, ".1f"),
                      f"{r['images_per_s']:.0f}", num(q["images_per_s"], ".2f"),
                      f"{100 * r['class_consistency']:.1f}%", f"{100 * b['class_consistency']:.1f}%",
                      f"{r['frechet']:.1f}", f"{b['frechet']:.1f}"))
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda vals: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def accel_to_json(rows: List[Dict]) -> str:
    return json.dumps([{k: r[k] for k in ACCEL_KEYS} for r in rows], indent=2)
