"""Statistics shared by the experiments: a one-sided Mann-Whitney U test, and how well one
score ranks candidates by their exact influence (correlations, recall@k, screen-then-verify).

Pure functions of numpy arrays, checked against scipy and by hand in the tests.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def mann_whitney_greater(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """One-sided Mann-Whitney U test that values in ``a`` tend to exceed those in ``b``.

    U counts the pairs (a_i, b_j) with a_i > b_j (ties count 1/2); p is scipy's (exact for
    tiny untied samples, else the tie-corrected normal approximation with continuity
    correction). p underflows to 0 for strong effects on thousands of values, so log10(p)
    is also given: log10 of p where p > 0, else computed from the normal approximation's z
    in log space (scipy.stats.norm.logsf). auc = U / (n_a n_b), the probability that a
    random a exceeds a random b.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    res = stats.mannwhitneyu(a, b, alternative="greater")
    n1, n2 = len(a), len(b)
    U = float(res.statistic)
    N = n1 + n2
    _, t = np.unique(np.concatenate([a, b]), return_counts=True)
    sigma = np.sqrt(n1 * n2 / 12.0 * ((N + 1) - float((t**3 - t).sum()) / (N * (N - 1))))
    z = (U - n1 * n2 / 2.0 - 0.5) / sigma if sigma > 0 else 0.0
    p = float(res.pvalue)
    log10_p = float(np.log10(p)) if p > 0 else float(stats.norm.logsf(z) / np.log(10))
    return {"U": U, "p_value": p, "log10_p": log10_p, "z": float(z), "auc": U / (n1 * n2),
            "n_a": n1, "n_b": n2}


def top_indices(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, ties broken by candidate order (stable sort)."""
    return np.argsort(-score, kind="stable")[:k]


def ranking_agreement(score: np.ndarray, exact: np.ndarray, k: int = 10) -> dict[str, float]:
    """How well ``score`` ranks one sample's candidates by their exact influence.

    spearman / pearson: correlations over all candidates; recall@k: |top-k(score) &
    top-k(exact)| / k; top1_in_exact_topk: whether score's top candidate is among the exact
    top k. Ties in the top-k are broken by candidate order (stable sort).
    """
    score, exact = np.asarray(score, float), np.asarray(exact, float)
    k = min(k, len(exact))
    top_s, top_e = top_indices(score, k), set(top_indices(exact, k).tolist())
    out = {"recall_at_k": len(set(top_s.tolist()) & top_e) / k,
           "top1_in_exact_topk": float(top_s[0] in top_e),
           "spearman": float("nan"), "pearson": float("nan")}
    if len(exact) >= 3 and np.ptp(exact) > 0 and np.ptp(score) > 0:
        out["spearman"] = float(stats.spearmanr(score, exact).statistic)
        out["pearson"] = float(stats.pearsonr(score, exact).statistic)
    return out


def verified_recall(score: np.ndarray, exact: np.ndarray, k: int, depth: int) -> float:
    """recall@k of screen-then-verify: ``score``'s top ``depth`` candidates re-ranked by their
    exact influence, top k of that against the exact top k. depth = k gives plain recall@k;
    it rises to 1 once ``depth`` reaches down to every exact top-k candidate."""
    score, exact = np.asarray(score, float), np.asarray(exact, float)
    k = min(k, len(exact))
    screened = top_indices(score, max(depth, k))
    verified = screened[top_indices(exact[screened], k)]
    return len(set(verified.tolist()) & set(top_indices(exact, k).tolist())) / k
