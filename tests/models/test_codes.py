"""Tests for models.codes: fixed-weight codes, Definition 1, capacity and code books."""

from __future__ import annotations

import math
import re
from itertools import combinations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from models.codes import (
    CapacityError,
    CodeBook,
    assign_codes,
    balanced_codes,
    make_codebook,
    pack_bits,
    satisfies_definition1,
    unpack_bits,
    validate_codes,
)

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def brute_definition1(codes: list[int]) -> bool:
    """For every ordered pair of distinct sources x != x', S(x) minus S(x') is non-empty."""
    return all(
        codes[a] & ~codes[b] != 0
        for a in range(len(codes)) for b in range(len(codes)) if a != b
    )


def popcount(c: int) -> int:
    return bin(c).count("1")


def member_loads(codes: np.ndarray, n: int) -> np.ndarray:
    return np.array([sum((int(c) >> i) & 1 for c in codes) for i in range(n)])


@st.composite
def n_k_N(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(2, 20))
    k = draw(st.integers(1, n - 1))
    N = draw(st.integers(1, min(math.comb(n, k), 300)))
    return n, k, N


# ----------------------------------------------------------------------------- brute force


def test_brute_force_reference_is_right() -> None:
    assert brute_definition1([0b0011, 0b0101, 0b0110])
    assert not brute_definition1([0b0011, 0b0111])  # subset
    assert not brute_definition1([0b0101, 0b0101])  # equal codes
    assert not brute_definition1([0b0000, 0b0001])  # the empty code is a subset of all
    assert brute_definition1([0b0001])
    assert brute_definition1([])


# ----------------------------------------------------------------------------- assign_codes


@PROPERTY
@given(n_k_N(), st.integers(0, 2**32 - 1))
def test_generated_codes_satisfy_definition1(nkN: tuple[int, int, int], seed: int) -> None:
    n, k, N = nkN
    codes = assign_codes(N, n, k, seed=seed)
    assert codes.shape == (N,)
    assert codes.dtype == np.int64
    as_int = [int(c) for c in codes]
    assert len(set(as_int)) == N, "codes are not distinct"
    assert all(0 <= c < (1 << n) for c in as_int), "a code uses bits beyond n"
    assert all(popcount(c) == k for c in as_int), "a code does not have weight k"
    assert satisfies_definition1(codes)
    assert brute_definition1(as_int)
    assert member_loads(codes, n).sum() == N * k


@st.composite
def n_k_N_half(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(2, 20))
    k = draw(st.integers(1, n - 1))
    N = draw(st.integers(1, max(1, min(math.comb(n, k) // 2, 300))))
    return n, k, N


@PROPERTY
@given(n_k_N_half(), st.integers(0, 2**32 - 1))
def test_loads_spread_evenly(nkN: tuple[int, int, int], seed: int) -> None:
    """Up to half capacity the loads never differ by more than 2 (near capacity: see below)."""
    n, k, N = nkN
    loads = member_loads(assign_codes(N, n, k, seed=seed), n)
    assert loads.max() - loads.min() <= 2, f"uneven loads {loads.tolist()}"


@pytest.mark.parametrize(("N", "n", "k", "seed"), [(60, 8, 4, 268), (105, 9, 5, 51),
                                                   (281, 11, 4, 132687697)])
def test_loads_spread_evenly_near_capacity(N: int, n: int, k: int, seed: int) -> None:
    """Balanced families exist for every N <= C(n, k) (e.g. whole rotation orbits plus a
    balanced remainder); these (N, n, k, seed) found by search give a spread of 3 or 4."""
    loads = member_loads(assign_codes(N, n, k, seed=seed), n)
    assert loads.max() - loads.min() <= 2, f"uneven loads {loads.tolist()}"


@PROPERTY
@given(
    st.integers(1, 12).flatmap(
        lambda bits: st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=25)
    ),
    st.integers(1, 7),
)
def test_satisfies_definition1_matches_brute_force(codes: list[int], chunk: int) -> None:
    arr = np.array(codes, dtype=np.int64)
    assert satisfies_definition1(arr) == brute_definition1(codes)
    assert satisfies_definition1(arr, chunk=chunk) == brute_definition1(codes)


@PROPERTY
@given(st.integers(3, 10).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(1, n - 1), st.integers(0, 10_000))))
def test_definition1_detects_one_planted_violation(args: tuple[int, int, int]) -> None:
    """Take valid codes, then plant a superset (or a duplicate) of one of them."""
    n, k, seed = args
    N = min(math.comb(n, k), 12)
    assume(N >= 2)
    codes = assign_codes(N, n, k, seed=seed)
    rng = np.random.default_rng(seed)
    victim = int(codes[rng.integers(N)])
    free = [i for i in range(n) if not (victim >> i) & 1]
    planted = victim | (1 << int(rng.choice(free))) if free and seed % 2 else victim
    bad = np.concatenate([codes, [planted]]).astype(np.int64)
    bad = bad[rng.permutation(len(bad))]
    assert not satisfies_definition1(bad)
    assert not brute_definition1([int(c) for c in bad])


def test_full_capacity_small_cases() -> None:
    """At N = C(n, k) every code is used exactly once, whatever the seed."""
    for n, k in [(4, 2), (5, 2), (6, 3), (7, 3), (8, 4)]:
        N = math.comb(n, k)
        codes = assign_codes(N, n, k, seed=1)
        expected = {sum(1 << b for b in comb) for comb in combinations(range(n), k)}
        assert {int(c) for c in codes} == expected


def test_reproducible_from_seed() -> None:
    a = assign_codes(200, 12, 6, seed=7)
    b = assign_codes(200, 12, 6, seed=7)
    c = assign_codes(200, 12, 6, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_default_k_is_half() -> None:
    codes = assign_codes(30, 9, seed=0)
    assert {popcount(int(c)) for c in codes} == {4}


def test_pack_unpack_roundtrip() -> None:
    codes = assign_codes(50, 10, 5, seed=3)
    bits = unpack_bits(codes, 10)
    assert bits.shape == (50, 10)
    for m, c in enumerate(codes):
        assert [(int(c) >> i) & 1 for i in range(10)] == bits[m].tolist()
    np.testing.assert_array_equal(pack_bits(bits), codes)


# ----------------------------------------------------------------------------- capacity


def smallest_fitting_n(N: int) -> int:
    n = 2
    while math.comb(n, n // 2) < N:
        n += 1
    return n


@pytest.mark.parametrize(("n", "k", "extra"), [(4, 2, 1), (6, 3, 1), (8, 4, 11), (10, 3, 500),
                                               (12, 6, 1), (16, 8, 5000),
                                               (5, 2, 10),  # N = 20 = C(6, 3) exactly
                                               (5, 2, 11)])  # N = 21 = C(7, 2) exactly
def test_capacity_error_names_smallest_n(n: int, k: int, extra: int) -> None:
    N = math.comb(n, k) + extra
    with pytest.raises(CapacityError) as info:
        assign_codes(N, n, k, seed=0)
    msg = str(info.value)
    fit = smallest_fitting_n(N)
    assert math.comb(fit, fit // 2) >= N > math.comb(fit - 1, (fit - 1) // 2)
    assert re.search(rf"\bn={fit}\b", msg), msg
    # holding k fixed, the smallest n with C(n, k) >= N
    fit_k = next(m for m in range(k + 1, 200) if math.comb(m, k) >= N)
    assert re.search(rf"\bn={fit_k}\b", msg), msg
    assert str(N) in msg
    # the n it names does fit
    assert len(assign_codes(N, fit, fit // 2, seed=0)) == N


def test_capacity_exactly_fits() -> None:
    assert len(assign_codes(math.comb(6, 3), 6, 3)) == 20


def test_capacity_error_is_value_error() -> None:
    assert issubclass(CapacityError, ValueError)
    # the weight check itself, not the capacity check that C(4, 0) = C(4, 4) = 1 < 3 would fail too
    with pytest.raises(CapacityError, match=r"code weight k=0 must satisfy 0 < k < n=4"):
        assign_codes(3, 4, 0)
    with pytest.raises(CapacityError, match=r"code weight k=4 must satisfy 0 < k < n=4"):
        assign_codes(3, 4, 4)


def test_make_codebook_capacity_error() -> None:
    with pytest.raises(CapacityError, match=r"n=8\b"):
        make_codebook(60, 6, 3)


# ----------------------------------------------------------------------------- code books


def _check_splits(book: CodeBook, item_group: np.ndarray) -> None:
    bits = book.bits()
    for i, items in enumerate(book.member_items()):
        expected = [x for x in range(len(item_group)) if bits[book.item_source[x], i]]
        assert items.tolist() == expected


def test_item_codebook() -> None:
    book = make_codebook(40, 8, 4, seed=2)
    assert book.granularity == "item"
    assert book.num_sources == 40
    assert book.source_keys[:3] == ("item:0", "item:1", "item:2")
    np.testing.assert_array_equal(book.item_source, np.arange(40))
    np.testing.assert_array_equal(book.codes, assign_codes(40, 8, 4, seed=2))
    _check_splits(book, np.arange(40))
    # S(x) of item x is exactly the set bits of its code
    for x in range(40):
        in_members = {i for i, items in enumerate(book.member_items()) if x in items}
        assert in_members == {i for i in range(8) if (int(book.codes[x]) >> i) & 1}


def test_class_codebook_groups_items() -> None:
    labels = np.array([3, 1, 3, 7, 1, 1, 9, 3, 7, 9, 9, 1])
    names = [f"digit{d}" for d in range(10)]
    book = make_codebook(len(labels), 5, 2, seed=4, granularity="class", labels=labels,
                         label_names=names)
    assert book.granularity == "class"
    assert book.source_keys == ("class:digit1", "class:digit3", "class:digit7", "class:digit9")
    for x, lab in enumerate(labels):
        assert book.source_keys[book.item_source[x]] == f"class:digit{lab}"
    # every item of a class shares its class's code
    for s in range(book.num_sources):
        items = book.source_items(s)
        assert {int(labels[x]) for x in items} == {int(book.source_keys[s].removeprefix(
            "class:digit"))}
    _check_splits(book, labels)
    for i, items in enumerate(book.member_items()):
        classes_in = {int(labels[x]) for x in items}
        classes_with_bit = {int(book.source_keys[s].removeprefix("class:digit"))
                            for s in range(4) if (int(book.codes[s]) >> i) & 1}
        assert classes_in == classes_with_bit


def test_class_codebook_without_names() -> None:
    labels = np.array([0, 2, 2, 5, 0, 5])
    book = make_codebook(6, 4, 2, granularity="class", labels=labels)
    assert book.source_keys == ("class:0", "class:2", "class:5")


def test_owner_codebook_groups_items() -> None:
    owners = ["bob", "alice", "bob", "carol", "alice", "dave", "erin", "bob"]
    book = make_codebook(len(owners), 6, 3, seed=1, granularity="owner", owners=owners)
    assert book.source_keys == ("owner:alice", "owner:bob", "owner:carol", "owner:dave",
                                "owner:erin")
    for x, who in enumerate(owners):
        assert book.source_keys[book.item_source[x]] == f"owner:{who}"
    np.testing.assert_array_equal(book.source_items(1), [0, 2, 7])
    _check_splits(book, np.array(owners))
    assert satisfies_definition1(book.codes)


def test_codebook_missing_groups_and_bad_granularity() -> None:
    with pytest.raises(ValueError, match="labels"):
        make_codebook(5, 4, 2, granularity="class")
    with pytest.raises(ValueError, match="owners"):
        make_codebook(5, 4, 2, granularity="owner")
    with pytest.raises(ValueError, match="granularity"):
        make_codebook(5, 4, 2, granularity="pixel")
    with pytest.raises(ValueError, match="3 class entries for 5 items"):
        make_codebook(5, 4, 2, granularity="class", labels=[0, 1, 2])
    with pytest.raises(ValueError, match="6 owner entries for 5 items"):
        make_codebook(5, 4, 2, granularity="owner", owners=list("abcdef"))


def test_empty_member_error() -> None:
    # one source of weight 2 leaves two of four members with nothing to train on
    with pytest.raises(ValueError, match="no item"):
        make_codebook(1, 4, 2)
    # two owners, weight 1, four members: at least two members are empty
    with pytest.raises(ValueError, match="no item") as info:
        make_codebook(6, 4, 1, granularity="owner", owners=["a", "b"] * 3)
    assert "members" in str(info.value)


def test_codebook_rejects_invalid_codes() -> None:
    with pytest.raises(ValueError, match="distinct"):
        CodeBook(4, 2, "item", ("a", "b"), np.array([3, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="weight"):
        CodeBook(4, 2, "item", ("a", "b"), np.array([3, 7]), np.array([0, 1]))
    with pytest.raises(ValueError, match="bits beyond"):
        CodeBook(4, 2, "item", ("a", "b"), np.array([3, 48]), np.array([0, 1]))


def test_balanced_codes() -> None:
    for n, S in ((8, 7), (16, 10), (32, 10)):
        codes = balanced_codes(S, n)
        validate_codes(codes, n, n // 2)  # distinct, weight n/2, Definition 1
        bits = unpack_bits(codes, n).astype(np.int64)
        ov = bits @ bits.T
        assert (np.diag(ov) == n // 2).all()
        assert (ov[~np.eye(S, dtype=bool)] == n // 4).all()
        assert (bits.sum(0) > 0).all()  # no member without data
    with pytest.raises(ValueError, match="power of two"):
        balanced_codes(5, 12)
    with pytest.raises(ValueError, match="at most 15"):
        balanced_codes(16, 16)
