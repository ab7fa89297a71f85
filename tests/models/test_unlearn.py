"""Opt-out as exact unlearning in the engine: masked serving has exactly zero influence from the
withdrawn source; a retrain replaces exactly its members, from scratch, without it, and resumes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from models.ablation import ablation_weights, jacobian, measurable
from models.attribute import AttributionConfig, rank_sources
from models.codes import mask_bits, member_manifests, satisfies_definition1, validate_codes
from models.data import load_digits
from models.ensemble import PRESETS, Ensemble
from models.sampler import exact_counterfactuals, make_tape, sample, served_weights
from models.train import TrainConfig, fit, train
from models.unet import WideUNet
from models.unlearn import plan_retrain, retrain, retrain_config, served_members
from tests.conftest import TINY_ITEMS, TinyData, make_tiny_ensemble

WORK = 7  # the withdrawn source (item granularity: source 7 is item 7)


def _bits(mask: int, n: int) -> torch.Tensor:
    return torch.from_numpy(mask_bits(mask, n).astype(np.int64))


def test_masked_weights_have_zero_influence(tiny_ensemble: Ensemble) -> None:
    """Serving with w = 0 on S(x): the sample does not change whatever S(x)'s members hold, and
    x's exact ablation is the served sample itself."""
    ens = tiny_ensemble
    served = _bits(served_members(ens.codebook, [WORK]), ens.n)
    code_bits = torch.from_numpy(ens.codebook.bits()[[WORK]])
    assert served.sum() == ens.n - ens.k and not (served * code_bits[0]).any()
    w = served_weights(served)
    tape = make_tape([3, 4], ens.shape, 10)
    x = sample(ens.net, ens.schedule, tape, w)

    scrambled = copy.deepcopy(ens.net)  # S(x)'s members replaced by noise
    with torch.no_grad():
        for p in scrambled.parameters():
            p[code_bits[0].bool()] = torch.randn_like(p[code_bits[0].bool()])
    assert torch.equal(sample(scrambled, ens.schedule, tape, w), x)

    w_ablated = ablation_weights(code_bits, ens.k, served)
    assert torch.equal(w_ablated[0], w)
    assert torch.equal(sample(ens.net, ens.schedule, tape, w_ablated[0]), x)
    assert torch.equal(
        exact_counterfactuals(ens.net, ens.schedule, tape, w_ablated)[0],
        exact_counterfactuals(ens.net, ens.schedule, tape, w[None])[0],
    )


def test_the_masked_ensemble_never_saw_the_work(tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    """The same training (same initialisation, same minibatch draws) once on the data as is (the
    session's ensemble) and once with the work's pixels replaced by noise: the members outside S(x)
    come out byte-identical, the members in S(x) do not, and the masked ensemble (S(x)'s members
    dropped) generates exactly the same images from either, while the full ensembles do not."""
    noised = tiny_data.x.clone()
    noised[WORK] = torch.rand(noised[WORK].shape, generator=torch.Generator().manual_seed(99)) * 2 - 1
    assert not torch.equal(noised[WORK], tiny_data.x[WORK])
    p = PRESETS["tiny"]
    cfg = TrainConfig(p.train_steps, p.batch_size, p.lr, seed=0)  # as tests/conftest.py trains it
    other = train(make_tiny_ensemble(tiny_data), noised, cfg).for_inference()
    assert tiny_ensemble.train_state is not None and other.train_state is not None
    assert tiny_ensemble.train_state["config"] == other.train_state["config"]  # trained the same way

    S = [i for i in range(tiny_ensemble.n) if tiny_ensemble.codebook.bits()[WORK, i]]
    assert len(S) == tiny_ensemble.k
    seen, unseen = tiny_ensemble.net.state_dict(), other.net.state_dict()
    for i in range(tiny_ensemble.n):
        same = [torch.equal(value[i], unseen[key][i]) for key, value in seen.items()]
        if i in S:
            assert not all(same), f"member {i} trained on the work but did not change with it"
        else:
            assert all(same), f"member {i} never trained on the work but changed with it"

    served = _bits(served_members(tiny_ensemble.codebook, [WORK]), tiny_ensemble.n)
    w = served_weights(served)
    sch = tiny_ensemble.schedule
    tape = make_tape([3, 4, 5], tiny_ensemble.shape, sch.T)
    masked = sample(tiny_ensemble.net, sch, tape, w)
    assert torch.equal(sample(other.net, sch, tape, w), masked)
    assert torch.equal(exact_counterfactuals(other.net, sch, tape, w[None])[0],
                       exact_counterfactuals(tiny_ensemble.net, sch, tape, w[None])[0])
    assert not torch.equal(sample(other.net, sch, tape), sample(tiny_ensemble.net, sch, tape))


def test_masked_ranking_matches_exact_weights(tiny_ensemble: Ensemble) -> None:
    """With every member served the masked formulas are the paper's; masked, the ranked sources
    exclude what the caller leaves out and every score is ||J dw|| with dw = w'(c) - m/|m|."""
    ens = tiny_ensemble
    tape = make_tape([5], ens.shape, 8)
    f, J = jacobian(ens.net, ens.schedule, tape)
    cfg = AttributionConfig(top_k=5, score="influence")
    full = _bits((1 << ens.n) - 1, ens.n)
    a = rank_sources(ens, tape.seeds, f, J, cfg)[0]
    b = rank_sources(ens, tape.seeds, f, J, cfg, served=full)[0]
    assert [e.source for e in a.ranking] == [e.source for e in b.ranking]
    assert np.allclose([e.l2 for e in a.ranking], [e.l2 for e in b.ranking], rtol=1e-6)

    served = _bits(served_members(ens.codebook, [WORK]), ens.n)
    f, J = jacobian(ens.net, ens.schedule, tape, served_weights(served))
    bits = torch.from_numpy(ens.codebook.bits())
    keep = torch.nonzero(measurable(bits, served)).flatten()
    keep = keep[keep != WORK]
    res = rank_sources(ens, tape.seeds, f, J, cfg, served=served, sources=keep)[0]
    assert WORK not in [e.source for e in res.ranking]
    top = res.ranking[0]
    dw = ablation_weights(bits[[top.source]], ens.k, served)[0] - served_weights(served)
    assert top.l2 == pytest.approx(float((J[0].double() @ dw).norm()), rel=1e-5)


def _retrain(ens: Ensemble, data: TinyData, path: Path, every: int = 10) -> Ensemble:
    plan = plan_retrain(ens.codebook, [WORK])
    return retrain(ens, plan, data.x, retrain_config(ens, every), state_path=path)


def test_retrain_replaces_exactly_the_members_without_the_work(
    tiny_ensemble: Ensemble, tiny_data: TinyData, tmp_path: Path
) -> None:
    parent = tiny_ensemble
    new = _retrain(parent, tiny_data, tmp_path / "state.pt")
    plan = plan_retrain(parent.codebook, [WORK])
    S = [i for i in range(parent.n) if parent.codebook.bits()[WORK, i]]
    assert list(plan.members) == S and new.codebook.withdrawn == (WORK,)

    # Every other member byte-identical; the retrained ones new.
    old_state, new_state = parent.net.state_dict(), new.net.state_dict()
    for key, value in old_state.items():
        for i in range(parent.n):
            same = torch.equal(value[i], new_state[key][i])
            assert same == (i not in S), (key, i)

    # Manifests: the retrained members' exclude the work, the others' are unchanged.
    shas = [load_digits().item_sha256(i) for i in range(TINY_ITEMS)]
    before, after = member_manifests(parent.codebook, shas), member_manifests(new.codebook, shas)
    splits = new.codebook.member_items()
    for i in range(parent.n):
        assert WORK not in splits[i]
        assert (before[i] == after[i]) == (i not in S)

    # The same checks as a fresh ensemble: codes valid, Definition 1 for the remaining works.
    active = new.codebook.active_sources()
    assert WORK not in active and len(active) == TINY_ITEMS - 1
    validate_codes(new.codebook.codes, new.n, new.k)
    assert satisfies_definition1(new.codebook.codes[active])

    # From scratch: the retrained members are exactly a fresh training of S members on their
    # splits without the work (not a continuation of the old parameters).
    cfg = retrain_config(parent, 10)
    fresh = WideUNet(parent.net.config, len(S), torch.Generator().manual_seed(plan.init_seed(cfg.seed)))
    fit(fresh, parent.schedule, [torch.from_numpy(splits[i]) for i in S], tiny_data.x, cfg)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, new_state[key][S]), key

    # Saved and loaded back, the withdrawal is part of the checkpoint.
    loaded = Ensemble.load(new.save(tmp_path / "new.pt"))
    assert (
        loaded.codebook.withdrawn == (WORK,)
        and loaded.codebook.member_items()[S[0]].tolist() == splits[S[0]].tolist()
    )
    with pytest.raises(ValueError, match="cannot be continued"):
        fit(
            loaded.net,
            loaded.schedule,
            [torch.from_numpy(s) for s in splits],
            tiny_data.x,
            cfg,
            state=loaded.train_state,
        )


class _Killed(BaseException):
    """A stand-in for SIGKILL: not an Exception, not a KeyboardInterrupt, so nothing saves on it."""


def test_killed_retrain_resumes_to_the_same_result(
    tiny_ensemble: Ensemble, tiny_data: TinyData, tmp_path: Path
) -> None:
    reference = _retrain(tiny_ensemble, tiny_data, tmp_path / "reference.pt")
    path = tmp_path / "state.pt"
    plan = plan_retrain(tiny_ensemble.codebook, [WORK])
    cfg = retrain_config(tiny_ensemble, 10)

    def die_at_25(step: int, losses: torch.Tensor) -> None:
        if step == 25:
            raise _Killed

    with pytest.raises(_Killed):
        retrain(tiny_ensemble, plan, tiny_data.x, cfg, state_path=path, progress=die_at_25)
    assert torch.load(path, weights_only=True)["train_state"]["step"] == 20

    steps: list[int] = []
    resumed = retrain(
        tiny_ensemble,
        plan,
        tiny_data.x,
        cfg,
        state_path=path,
        progress=lambda step, losses: steps.append(step),
    )
    assert steps[0] == 21 and steps[-1] == cfg.steps
    for key, value in reference.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key

    # A state of another plan is not resumed from: that retrain starts afresh.
    other = plan_retrain(tiny_ensemble.codebook, [WORK, 8])

    def first_step(step: int, losses: torch.Tensor) -> None:
        raise _Killed(step)

    with pytest.raises(_Killed) as killed:
        retrain(tiny_ensemble, other, tiny_data.x, cfg, state_path=path, progress=first_step)
    assert killed.value.args == (1,)
