"""``varcore eval``: sample every bundled model on this machine and score the samples with the quality harness.

For each model, ``per_class`` images of each of the 10 classes are drawn in batches of ``batch_size`` (one seed
per batch, derived from ``seed``). The first batch is a warm-up: images/s is the median over the other batches
(wall-clock, sampling and decoding, one process; the machine may be shared, so compare rows of one run only).
Class consistency and the Fréchet distance (against the held-out test digits) use all images.
"""
import json
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from varcore.digits import BUNDLED, DigitsSampler, bundled_names
from varcore.digits.quality import (class_consistency, classifier_features, frechet_distance, load_classifier,
                                    reference_features)

__all__ = ["evaluate", "format_table", "reference_scores", "EVAL_KEYS"]

EVAL_KEYS = ("model", "decoding", "steps", "images_per_s", "class_consistency", "frechet")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@torch.no_grad()
def evaluate_model(name: str, classifier, ref_feats: torch.Tensor, per_class: int = 50, batch_size: int = 100,
                   seed: int = 0, device="cpu", weights_root=None, progress: bool = False,
                   cfg: Optional[float] = None) -> Dict:
    """One row of the table for bundled model ``name`` (keys :data:`EVAL_KEYS`)."""
    sampler = DigitsSampler(name, device=device, weights_root=weights_root)
    labels = torch.arange(10).repeat_interleave(per_class)
    images, seconds = [], []
    batches = list(labels.split(batch_size))
    for i, lab in enumerate(tqdm(batches, desc=name, disable=not progress, dynamic_ncols=True, leave=False)):
        t0 = time.perf_counter()
        img = sampler.sample(lab, seed=seed * 100003 + i, cfg=cfg)
        if img.is_cuda:
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - t0) / lab.shape[0])
        images.append(img.cpu())
    images = torch.cat(images)
    timed = seconds[1:] or seconds  # the first batch warms up (allocations, lazy init)
    return {"model": name, "decoding": sampler.decoding, "steps": int(sampler.steps),
            "images_per_s": 1.0 / statistics.median(timed),
            "class_consistency": class_consistency(classifier, images, labels),
            "frechet": frechet_distance(classifier_features(classifier, images), ref_feats)}


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
