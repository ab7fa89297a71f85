"""Tests for experiments/: each experiment's computation end to end on tiny ensembles, its raw numbers
against independent recomputation (the wide sampler with explicit weights, numpy, scipy),
and its statistics against scipy on the same numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.model_selection import train_test_split

from experiments import classes, classifiers, copies, fidelity, statistics
from models.ablation import ablation_weights, delta_w, gram, influence, jacobian
from models.codes import make_codebook
from models.data import load_digits
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.sampler import make_tape, sample
from models.train import TrainConfig, train
from tests.conftest import TinyData

STEPS = 5


def _exact(ens: Ensemble, tape_seed: int, source: int) -> torch.Tensor:
    """Independent exact counterfactual: the wide sampler with the ablation weights."""
    bits = torch.from_numpy(ens.codebook.bits())[source : source + 1]
    w = ablation_weights(bits, ens.k)[0]
    return sample(ens.net, ens.schedule, make_tape([tape_seed], ens.shape, STEPS), w)[0]


# ----------------------------------------------------------------------------- statistics
def test_mann_whitney_against_pairs_and_scipy() -> None:
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(0.5, 1, 40), 1)  # rounding makes ties
    b = np.round(rng.normal(0.0, 1, 90), 1)
    mw = statistics.mann_whitney_greater(a, b)
    pairs = (a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()
    assert mw["U"] == pytest.approx(pairs)
    ref = stats.mannwhitneyu(a, b, alternative="greater")
    assert mw["p_value"] == pytest.approx(ref.pvalue)
    assert mw["log10_p"] == pytest.approx(np.log10(ref.pvalue), rel=1e-6)
    assert mw["auc"] == pytest.approx(pairs / (40 * 90))
    # a separation strong enough that p underflows: log10 p stays finite and tiny
    strong = statistics.mann_whitney_greater(np.arange(3000) + 30000.0, np.arange(20000.0))
    assert strong["p_value"] == 0.0 and strong["auc"] == 1.0
    assert -1e5 < strong["log10_p"] < -1000
    # where p does not underflow, the log-space normal approximation agrees with scipy's
    big_a, big_b = rng.normal(1.0, 1, 2000), rng.normal(0.0, 1, 5000)
    p_big = stats.mannwhitneyu(big_a, big_b, alternative="greater").pvalue
    z = statistics.mann_whitney_greater(big_a, big_b)["z"]
    assert 1e-280 < p_big < 1e-30
    assert stats.norm.logsf(z) / np.log(10) == pytest.approx(np.log10(p_big), rel=1e-6)
    # no effect: p near 1/2, not significant
    assert statistics.mann_whitney_greater(b, b)["p_value"] > 0.4


def test_class_ablation_stats_by_hand() -> None:
    dist = np.array([[3.0, 1.0, 2.0],   # predicted 0: largest
                     [1.0, 2.0, 2.0],   # predicted 1: tied with 2 -> not largest
                     [5.0, 1.0, 0.5],   # predicted 2: not largest
                     [0.0, 4.0, 1.0]])  # predicted 1: largest
    pred = np.array([0, 1, 2, 1])
    conf = np.array([0.95, 0.5, 0.99, 0.3])
    st = classes.class_ablation_stats(dist, pred, conf, 0.9)
    assert st["frac_largest"] == 0.5
    assert st["n_confident"] == 2 and st["frac_largest_confident"] == 0.5
    own = np.array([3.0, 2.0, 0.5, 4.0])
    others = np.array([1.0, 2.0, 1.0, 2.0, 5.0, 1.0, 0.0, 1.0])
    ref = stats.mannwhitneyu(own, others, alternative="greater")
    assert st["mann_whitney"]["U"] == pytest.approx(ref.statistic)
    assert st["mann_whitney"]["p_value"] == pytest.approx(ref.pvalue)
    assert st["median_predicted"] == 2.5 and st["median_other"] == 1.0


def test_ranking_agreement_by_hand() -> None:
    exact = np.arange(20.0)
    score = exact.copy()
    score[[19, 0]] = score[[0, 19]]  # exact's best ranked last, its worst first
    ag = statistics.ranking_agreement(score, exact, k=5)
    assert ag["recall_at_k"] == 4 / 5
    assert ag["top1_in_exact_topk"] == 0.0
    assert ag["spearman"] == pytest.approx(stats.spearmanr(score, exact).statistic)
    assert ag["pearson"] == pytest.approx(stats.pearsonr(score, exact).statistic)


def test_verified_recall_by_hand() -> None:
    exact = np.arange(20.0)  # candidate 19 is the most influential
    score = -exact.copy()  # the screen ranks exactly backwards, except that ...
    score[[15, 16, 17, 18, 19]] += 100.0  # ... it puts the exact top 5 first
    assert statistics.ranking_agreement(score, exact, k=5)["recall_at_k"] == 1.0
    score[19] = -50.0  # the screen now misses the exact best: it ranks last
    assert statistics.verified_recall(score, exact, k=5, depth=5) == 4 / 5
    assert statistics.verified_recall(score, exact, k=5, depth=19) == 4 / 5  # 19 is screened out
    assert statistics.verified_recall(score, exact, k=5, depth=20) == 1.0  # depth reaches it
    # verification re-ranks by exact: a wrong order inside the screen does not matter
    wrong = np.array([0.0, 9.0, 8.0, 7.0, 6.0, 5.0])
    assert statistics.verified_recall(wrong, np.arange(6.0), k=2, depth=6) == 1.0
    assert statistics.verified_recall(wrong, np.arange(6.0), k=2, depth=2) == 0.0


# ----------------------------------------------------------------------------- class control
@pytest.fixture(scope="module")
def class_ensemble() -> tuple[Ensemble, torch.Tensor]:
    """The tiny preset, n = 8, one code per class over the first 120 digits."""
    ds = load_digits().subset(np.arange(120))
    assert ds.labels is not None
    book = make_codebook(ds.N, 8, 4, seed=0, granularity="class", labels=ds.labels)
    ens = Ensemble.create(PRESETS["tiny"], book, DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape), 0)
    train(ens, ds.to_tensor(), TrainConfig(8, 8, 2e-3, seed=0))
    return ens.for_inference(), ds.to_tensor()


def test_class_ablation_end_to_end(class_ensemble: tuple[Ensemble, torch.Tensor]) -> None:
    ens, x = class_ensemble
    y = ens.codebook.item_source
    clf = classifiers.train_classifier(x, y, kind="logreg")
    assert clf.n_train == 96 and clf.n_test == 24  # a stratified fifth of the 120 held out
    # the held-out split recomputed (stratified, seed 0): accuracy is measured there, not on the
    # training split (where logistic regression is perfect), and is far above chance (1/10)
    x_tr, x_te, y_tr, y_te = train_test_split(x.flatten(1).numpy(), y, test_size=0.2, stratify=y,
                                              random_state=0)
    assert clf.accuracy == pytest.approx(np.mean(clf.model.predict(x_te) == y_te)) == pytest.approx(22 / 24)
    assert np.mean(clf.model.predict(x_tr) == y_tr) == 1.0
    seeds = list(range(5))
    calls: list[tuple[str, int, int]] = []
    res = classes.class_ablation(ens, make_tape(seeds, ens.shape, STEPS), clf, keep=2, chunk=16,
                           progress=lambda *a: calls.append(a))
    S = ens.codebook.num_sources
    assert res.l2.shape == (5, S) and res.kept.shape == (2, S, 1, 8, 8)
    assert ("exact", 5 * S, 5 * S) in calls and ("sample", 5, 5) in calls
    np.testing.assert_allclose(res.proba, clf.predict_proba(res.images))
    for b, s in ((0, 0), (3, S - 1), (4, int(res.predicted[4]))):
        cf = _exact(ens, seeds[b], s)
        ref = np.linalg.norm((cf - sample(ens.net, ens.schedule, make_tape([seeds[b]], ens.shape, STEPS))[0])
                             .numpy())
        assert res.l2[b, s] == pytest.approx(ref, abs=1e-4)
    cf4 = _exact(ens, seeds[4], int(res.predicted[4]))
    assert res.cf_pred[4] == clf.predict_proba(cf4[None]).argmax()
    torch.testing.assert_close(res.kept[1, 0], _exact(ens, seeds[1], 0), atol=1e-4, rtol=0)
    st = classes.class_ablation_stats(res.l2, res.predicted, res.confidence)
    own = res.l2[np.arange(5), res.predicted]
    others = np.concatenate([np.delete(res.l2[b], res.predicted[b]) for b in range(5)])
    assert st["mann_whitney"]["p_value"] == pytest.approx(
        stats.mannwhitneyu(own, others, alternative="greater").pvalue)


def test_cnn_classifier_learns_digits_reproducibly() -> None:
    """The small CNN: a real classifier (held-out accuracy well above chance on the 10 digit
    classes), probabilities that sum to one, the same model from the same seed, and the
    global torch RNG left as it was."""
    ds = load_digits()
    assert ds.labels is not None
    x, y = ds.to_tensor(), ds.labels
    state = torch.random.get_rng_state()
    clf = classifiers.train_classifier(x, y, kind="cnn", seed=3, cnn_epochs=10)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert clf.kind == "cnn" and clf.accuracy > 0.85 and clf.n_train + clf.n_test == ds.N
    p = clf.predict_proba(x[:40])
    assert p.shape == (40, 10)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    again = classifiers.train_classifier(x, y, kind="cnn", seed=3, cnn_epochs=10)
    np.testing.assert_array_equal(again.predict_proba(x[:40]), p)
    other = classifiers.train_classifier(x, y, kind="cnn", seed=4, cnn_epochs=10)
    assert not np.array_equal(other.predict_proba(x[:40]), p)
    with pytest.raises(ValueError, match="classifier must be one of"):
        classifiers.train_classifier(x, y, kind="resnet")


def test_class_ablation_refuses_item_granularity(tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    clf = classifiers.train_classifier(tiny_data.x, tiny_data.labels, kind="logreg")
    with pytest.raises(ValueError, match="class-granularity"):
        classes.class_ablation(tiny_ensemble, make_tape([0], tiny_ensemble.shape, 2), clf)


# ----------------------------------------------------------------------------- fidelity
@pytest.fixture(scope="module")
def fid(tiny_ensemble: Ensemble, tiny_data: TinyData) -> fidelity.Fidelity:
    return fidelity.fidelity(tiny_ensemble, make_tape([0, 1, 2], tiny_ensemble.shape, STEPS), tiny_data.x,
                      chunk=64, jacobian_batch=2)


def test_fidelity_numbers_are_independent_recomputations(fid: fidelity.Fidelity, tiny_ensemble: Ensemble,
                                                         tiny_data: TinyData) -> None:
    ens = tiny_ensemble
    S = ens.codebook.num_sources
    assert fid.all_sources and all(len(c) == S for c in fid.candidates)
    tape = make_tape(fid.seeds, ens.shape, STEPS)
    f, J = jacobian(ens.net, ens.schedule, tape)
    dW = delta_w(torch.from_numpy(ens.codebook.bits()), ens.k)
    syn = influence(gram(J), dW).numpy()
    for b in range(3):
        np.testing.assert_allclose(fid.synthetic[b], syn[b, fid.candidates[b]], rtol=1e-5)
        pix = -np.linalg.norm((tiny_data.x - f[b]).flatten(1).numpy(), axis=1)
        np.testing.assert_allclose(fid.pixel[b], pix[fid.candidates[b]], rtol=1e-5)
    for b, s in ((0, 5), (2, 41)):
        j = int(np.flatnonzero(fid.candidates[b] == s)[0])
        cf = _exact(ens, fid.seeds[b], s)
        assert fid.exact[b][j] == pytest.approx(float((cf - f[b]).norm()), abs=1e-4)
        pred = (f[b] + (J[b] @ dW[s].float()).reshape(f[b].shape)).clamp(-1, 1)
        assert fid.rel_err[b][j] == pytest.approx(float((pred - cf).norm() / (cf - f[b]).norm()), rel=1e-3)


def test_fidelity_stats_match_scipy_and_random_scores_fail(fid: fidelity.Fidelity) -> None:
    st = fidelity.fidelity_stats(fid, k=10)
    rhos = [stats.spearmanr(fid.synthetic[b], fid.exact[b]).statistic for b in range(3)]
    assert st["summary"]["synthetic"]["median_spearman"] == pytest.approx(np.median(rhos))
    pix = [stats.spearmanr(fid.pixel[b], fid.exact[b]).statistic for b in range(3)]
    assert st["summary"]["pixel"]["median_spearman"] == pytest.approx(np.median(pix))
    recalls = [len(set(np.argsort(-fid.synthetic[b])[:10]) & set(np.argsort(-fid.exact[b])[:10])) / 10
               for b in range(3)]
    assert st["summary"]["synthetic"]["median_recall_at_k"] == pytest.approx(np.median(recalls))
    assert st["summary"]["median_rel_err"] == pytest.approx(np.median(np.concatenate(fid.rel_err)))
    # screen-then-verify: an independent re-ranking of the synthetic top 20 by exact distance
    ver = []
    for b in range(3):
        screen = np.argsort(-fid.synthetic[b])[:20]
        top = screen[np.argsort(-fid.exact[b][screen])[:10]]
        ver.append(len(set(top) & set(np.argsort(-fid.exact[b])[:10])) / 10)
    assert st["summary"]["verified"]["20"]["median_recall_at_k"] == pytest.approx(np.median(ver))
    assert all(v >= r for v, r in zip(ver, recalls, strict=True))  # verifying deeper never loses
    # a deliberately broken attribution: random scores must fail the thresholds
    rng = np.random.default_rng(0)
    broken = dataclasses.replace(fid, synthetic=[rng.random(len(e)) for e in fid.exact])
    bst = fidelity.fidelity_stats(broken, k=10)
    broken_targets = fidelity.targets(bst["summary"])
    assert not all(o.met for o in broken_targets.values())
    assert not broken_targets["median_spearman"].met
    assert not broken_targets["median_recall_at_k"].met
    assert bst["summary"]["synthetic"]["median_spearman"] < 0.5
    # the real synthetic ranking is far better than random on the same exact numbers
    margin = st["summary"]["synthetic"]["median_spearman"] - bst["summary"]["synthetic"]["median_spearman"]
    assert margin > 0.3


def test_fidelity_subset_candidates(tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    def by_index(scores: torch.Tensor) -> torch.Tensor:  # source s scores s: the top 4 are 56..59
        return torch.arange(scores.shape[1], dtype=scores.dtype).expand_as(scores)

    res = fidelity.fidelity(tiny_ensemble, make_tape([7], tiny_ensemble.shape, 3), tiny_data.x, subset=6,
                            top=4, score_fn=by_index)
    c = res.candidates[0]
    assert not res.all_sources and len(np.unique(c)) == len(c) and 6 <= len(c) <= 6 + 4 + 4
    assert {56, 57, 58, 59} <= set(c.tolist())
    np.testing.assert_array_equal(res.synthetic[0], c.astype(float))
    full = fidelity.pixel_scores(res.images, tiny_data.x, tiny_ensemble.codebook.item_source, 60)[0].numpy()
    assert set(np.argsort(-full)[:4].tolist()) <= set(c.tolist())
    np.testing.assert_allclose(res.pixel[0], full[c])


# ----------------------------------------------------------------------------- copies
def test_nearest_training_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    xt = torch.rand(30, 1, 4, 4, generator=g)
    xs = torch.cat([xt[[3, 17]] + 0.001, torch.rand(2, 1, 4, 4, generator=g)])
    idx, dist, med = copies.nearest_training(xs, xt)
    D = np.linalg.norm(xs.flatten(1).numpy()[:, None] - xt.flatten(1).numpy()[None], axis=2)
    np.testing.assert_array_equal(idx, D.argmin(1))
    np.testing.assert_allclose(dist, D.min(1), rtol=1e-6)
    assert list(idx[:2]) == [3, 17]
    T = np.linalg.norm(xt.flatten(1).numpy()[:, None] - xt.flatten(1).numpy()[None], axis=2)
    np.fill_diagonal(T, np.inf)
    assert med == pytest.approx(float(np.median(T.min(1))))


def test_copy_detection_end_to_end(tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    ens = tiny_ensemble
    res = copies.copy_detection(ens, make_tape(range(4), ens.shape, STEPS), tiny_data.x, top=3,
                                jacobian_batch=3)
    _, J = jacobian(ens.net, ens.schedule, make_tape(range(4), ens.shape, STEPS))
    syn = influence(gram(J), delta_w(torch.from_numpy(ens.codebook.bits()), ens.k)).numpy()
    best = syn[np.arange(4), res.top_sources[:, 0]]  # the top source scores the maximum (float32 ties)
    np.testing.assert_allclose(best, syn.max(1), rtol=1e-5)
    everything = copies.copy_stats(res, copy_ratio=1e9)  # every sample counts as a copy
    assert everything["n_copies"] == 4
    hits = np.mean(res.top_sources[:, 0] == res.nn_source)
    assert everything["top1_rate_copies"] == pytest.approx(hits) == everything["top1_rate_all"]
    nothing = copies.copy_stats(res, copy_ratio=0.0)
    assert nothing["n_copies"] == 0 and np.isnan(nothing["top1_rate_copies"])


def test_copy_stats_by_hand() -> None:
    res = copies.CopyDetection(seeds=[0, 1, 2, 3], images=torch.zeros(4, 1, 2, 2),
                          nn_item=np.array([5, 6, 7, 8]), nn_dist=np.array([0.1, 0.2, 0.9, 0.3]),
                          train_nn_median=1.0, top_sources=np.array([[5, 1], [2, 6], [7, 0], [8, 3]]),
                          nn_source=np.array([5, 6, 7, 8]), nn_rank=np.array([1, 2, 1, 1]))
    st = copies.copy_stats(res, copy_ratio=0.5)  # copies: samples 0, 1, 3
    assert st["n_copies"] == 3 and st["top1_rate_copies"] == pytest.approx(2 / 3)
    assert st["top2_rate_copies"] == 1.0 and st["top1_rate_all"] == 0.75
    assert st["median_nn_synthetic_rank_copies"] == 1.0 and "exact" not in st

    # Exact distances over 9 sources for samples 1 (a copy) and 2 (not a copy).
    exact = np.zeros((2, 9))
    exact[0, [2, 4, 6]] = [3.0, 2.0, 1.0]  # sample 1: exact top 2 (the synthetic top-1), nearest 6 third
    exact[1, [0, 3, 7]] = [1.0, 5.0, 4.0]  # sample 2: exact top 3, nearest 7 second, synthetic top 7, 0
    st = copies.copy_stats(dataclasses.replace(res, exact_rows=np.array([1, 2]), exact=exact), 0.5)["exact"]
    assert st["sources"] == 9
    assert st["copies"] == {"n": 1, "exact_top1_rate": 0.0, "median_nn_exact_rank": 3.0,
                            "median_nn_synthetic_rank": 2.0, "synthetic_top1_is_exact_top1_rate": 1.0,
                            "verified_top2_top1_rate": 0.0}
    assert st["all_checked"] == {"n": 2, "exact_top1_rate": 0.0, "median_nn_exact_rank": 2.5,
                                 "median_nn_synthetic_rank": 1.5, "synthetic_top1_is_exact_top1_rate": 0.5,
                                 "verified_top2_top1_rate": 0.5}  # sample 2: 7 beats 0 among its top 2
    assert [p["exact_top1"] for p in st["per_sample"]] == [2, 3]
    assert [p["nn_exact_rank"] for p in st["per_sample"]] == [3, 2]


def test_exact_copy_check_brute_force(tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    ens, S = tiny_ensemble, tiny_ensemble.codebook.num_sources
    tape = make_tape(range(3), ens.shape, STEPS)
    res = copies.copy_detection(ens, tape, tiny_data.x, top=S, jacobian_batch=3)
    # nn_rank: the nearest image's position in the full synthetic order (top = all S sources here)
    np.testing.assert_array_equal(res.nn_rank, [1 + list(res.top_sources[b]).index(res.nn_source[b])
                                                for b in range(3)])
    chk = copies.exact_copy_check(ens, tape, res, np.array([2, 0]), tiny_data.x)
    assert chk.exact is not None and res.exact is None and chk.exact_resemblance is not None
    assert chk.exact.shape == (2, S) and list(chk.exact_rows) == [2, 0]
    for j, b in enumerate([2, 0]):
        for s in (0, 7, S - 1):
            cf = _exact(ens, b, s)
            d = float((cf - res.images[b]).flatten().norm())
            assert chk.exact[j, s] == pytest.approx(d, rel=1e-4, abs=1e-5)
            x = tiny_data.x[s]  # item granularity: source s is item s
            r = float((cf - x).flatten().norm() - (res.images[b] - x).flatten().norm())
            assert chk.exact_resemblance[j, s] == pytest.approx(r, rel=1e-4, abs=1e-5)
    st = copies.copy_stats(chk, copy_ratio=1e9)["exact"]
    top1 = chk.exact.argmax(1)
    assert st["all_checked"]["exact_top1_rate"] == pytest.approx(np.mean(top1 == res.nn_source[[2, 0]]))
    # with every source in the synthetic top list, verification is the exact top-1
    assert st["all_checked"][f"verified_top{S}_top1_rate"] == st["all_checked"]["exact_top1_rate"]


# ----------------------------------------------------------------------------- configs and reports
def test_targets_read_as_the_reports_write_them() -> None:
    from experiments.common import Comparison, Outcome, Report, Target

    assert [str(t) for t in (classes.P_VALUE, classes.FRAC_LARGEST, classes.MIN_SAMPLES,
                             fidelity.MEDIAN_SPEARMAN, copies.TOP1_RATE_COPIES)] == \
        ["< 1e-30", ">= 0.6", ">= 1000", ">= 0.95", ">= 0.9"]
    assert Target(">=", 0.8).outcome(0.8).met and not Target(">=", 0.8).outcome(float("nan")).met
    beats = Comparison("synthetic", ">", "pixel").outcome(0.5, 0.5)
    assert beats.to_json() == {"value": [0.5, 0.5], "target": "synthetic > pixel", "met": False}

    def passed(*outcomes: Outcome) -> bool:
        return Report("x", {str(i): o for i, o in enumerate(outcomes)}, {}, (), "").passed

    positive = Target(">", 0)
    met, missed, unmeasured = positive.outcome(1), positive.outcome(0), positive.unmeasured()
    assert passed(met, unmeasured) and not passed(met, missed) and not passed(unmeasured) and not passed()


def test_run_returns_the_report_it_writes(tmp_path: Path) -> None:
    """copies.run on a config (no flags): the typed report, report.json equal to its JSON, the
    figures named in it, and user errors as ExperimentError with the CLI's words."""
    import json

    from experiments import run
    from experiments.common import Checkpoint, ExperimentError, Training

    config = copies.CopiesConfig(ensemble=Training(subset=30, preset="tiny", n=8, train_steps=4), samples=2,
                                 steps=3, copy_ratio=1e9)
    stages: list[str] = []
    report = run(config, tmp_path, lambda stage, done, total: stages.append(stage))
    assert set(stages) == set(config.stages()) == {"train", "jacobian", "trust"}
    outcome = report.targets["top1_rate_copies"]
    assert outcome.target is copies.TOP1_RATE_COPIES
    # 4 training steps: neither sample's copy is found (first, in the top 3, or attributable), which
    # the shuffled-codes control also does not find: only that target is met, and the run fails
    assert {name: (o.value, o.met) for name, o in report.targets.items()} == {
        "top1_rate_copies": (0.0, False), "top3_rate_copies": (0.0, False),
        "attributable_copies": (0.0, False), "shuffled_attributable": (0.0, True),
        "selective_attributable_copies": (0.0, False), "cause_on_top_copies": (None, None),
        "far_attributable": (None, None)}
    assert report.passed is False
    trust = report.numbers["trust"]
    assert trust["score"] == "resemblance" and trust["verify_top_k"] == 30  # all 30 sources, verified
    assert set(trust) >= {"service_default", "synthetic_only", "shuffled_codes"}
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == report.to_json() and written["passed"] is report.passed
    assert written["targets"]["top1_rate_copies"]["target"] == ">= 0.9" and written["n_copies"] == 2
    assert all((tmp_path / name).is_file() for name in report.figures)
    again = copies.CopiesConfig(ensemble=Checkpoint(checkpoint=str(tmp_path / "ensemble.pt")), steps=99)
    with pytest.raises(ExperimentError, match=r"--steps must be in 1\.\.20"):
        run(again, tmp_path / "again")
