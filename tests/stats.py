"""Goodness-of-fit helpers for the tests of samplers that must keep a distribution."""
from scipy.stats import chi2


def chi_square_p(counts, probs):
    """p-value of Pearson's chi-square of ``counts`` against ``probs``: outcomes are taken in order of probability
    and pooled into consecutive bins of at least 5 expected draws each (the last bin takes the remainder)."""
    n = counts.sum().item()
    order = probs.argsort()
    expected, observed = (probs[order] * n).tolist(), counts[order].tolist()
    bins, e_bin, o_bin = [], 0.0, 0
    for e, o in zip(expected, observed):
        e_bin, o_bin = e_bin + e, o_bin + o
        if e_bin >= 5:
            bins.append((o_bin, e_bin))
            e_bin, o_bin = 0.0, 0
    if bins and e_bin > 0:
        o_last, e_last = bins.pop()
        bins.append((o_last + o_bin, e_last + e_bin))
    stat = sum((o - e) ** 2 / e for o, e in bins)
    return chi2.sf(stat, len(bins) - 1)
