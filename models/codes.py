"""Fixed-weight bit codes for an encoded ensemble (paper, Definition 1 and Section 3).

Every *source* s (one training item, a class, or an owner's works) gets a distinct bit
vector c_s of length n and Hamming weight k. Member i trains on every item whose source's
code has bit i set, so S(x) = {i : c_i = 1}. Distinct codes of equal weight are never
subsets of one another, hence S(x) \\ S(x') is non-empty for every x != x' (Definition 1).

Codes are stored as integer bitmasks (bit i = member i), so n <= 63 fits a signed 64-bit
integer (a BIGINT column).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

MAX_MEMBERS = 63


class CapacityError(ValueError):
    """The number of sources exceeds C(n, k); the message names an n that fits."""


def capacity(n: int, k: int) -> int:
    """Number of distinct weight-k codes of length n: C(n, k)."""
    return math.comb(n, k)


def default_k(n: int) -> int:
    """The default Hamming weight, k = n/2 (rounded down), which maximises C(n, k)."""
    return n // 2


def smallest_n(num_sources: int, k: int | None = None) -> int:
    """Smallest ensemble size n whose capacity holds ``num_sources`` codes.

    With ``k=None`` the weight follows n (k = n // 2); otherwise k is held fixed.
    """
    n = 2 if k is None else max(k + 1, 2)
    while capacity(n, default_k(n) if k is None else k) < num_sources:
        n += 1
        if n > MAX_MEMBERS:
            raise CapacityError(
                f"{num_sources} sources do not fit any ensemble of at most {MAX_MEMBERS} members"
            )
    return n


def check_capacity(num_sources: int, n: int, k: int) -> None:
    """Raise :class:`CapacityError` (naming the smallest n that fits) when N > C(n, k)."""
    if not 1 <= n <= MAX_MEMBERS:
        raise CapacityError(f"n={n} members is outside 1..{MAX_MEMBERS} (codes are 63-bit masks)")
    if not 0 < k < n:
        raise CapacityError(f"code weight k={k} must satisfy 0 < k < n={n}")
    cap = capacity(n, k)
    if num_sources > cap:
        fit_fixed_k = smallest_n(num_sources, k)
        fit_half = smallest_n(num_sources)
        raise CapacityError(
            f"{num_sources} sources do not fit an ensemble of n={n}, k={k}: only "
            f"C({n},{k})={cap} distinct codes exist. The smallest n that fits is "
            f"n={fit_half} (k={default_k(fit_half)}), or n={fit_fixed_k} keeping k={k}."
        )


def _rotate(c: int, r: int, n: int, mask: int) -> int:
    return ((c << r) | (c >> (n - r))) & mask if r else c


def _random_code(rng: np.random.Generator, n: int, k: int) -> int:
    bits = rng.permutation(n)[:k]
    return int(np.bitwise_or.reduce(np.left_shift(np.int64(1), bits.astype(np.int64))))


def assign_codes(num_sources: int, n: int, k: int | None = None, seed: int = 0) -> np.ndarray:
    """Distinct weight-k codes for ``num_sources`` sources, spread evenly over the n members.

    Whole cyclic-rotation orbits of random aperiodic codes are taken first: an orbit adds
    exactly k to every member's load, so those codes are perfectly balanced. The remainder
    (fewer than n codes, or what is left near capacity) goes greedily to the least-loaded
    members with random tie-breaking. Reproducible from ``seed``.

    When k = n/2, complementary codes are avoided while N <= C(n, k)/4: dw(~c) = -dw(c),
    so synthetic ablation's Euclidean influence ||J dw|| could not tell such a pair apart.

    Returns:
        codes: (num_sources,) int64 bitmasks, bit i set when member i trains on the source.
    """
    k = default_k(n) if k is None else k
    check_capacity(num_sources, n, k)
    rng = np.random.default_rng(seed)
    mask = (1 << n) - 1
    used: set[int] = set()  # codes taken (and, when avoiding them, their complements)
    avoid_complements = 2 * k == n and num_sources <= capacity(n, k) // 4

    def take(codes: list[int]) -> None:
        used.update(codes)
        if avoid_complements:
            used.update(c ^ mask for c in codes)

    out: list[int] = []
    loads = np.zeros(n, dtype=np.int64)

    # 1) Perfectly balanced rotation orbits.
    want_orbits = num_sources // n
    misses = 0
    while len(out) < want_orbits * n and misses < 200:
        c = _random_code(rng, n, k)
        orbit = [_rotate(c, r, n, mask) for r in range(n)]
        clash = len(set(orbit)) < n or any(o in used for o in orbit)
        if avoid_complements and not clash:
            clash = any((o ^ mask) in set(orbit) for o in orbit)
        if clash:
            misses += 1
            continue
        misses = 0
        take(orbit)
        out.extend(orbit)
    loads += k * (len(out) // n)

    # 2) Greedy remainder: the least-loaded members (random tie-breaks within a load level);
    #    if that code is taken, the unused code whose members carry the least load.
    pool: np.ndarray | None = None
    while len(out) < num_sources:
        code = None
        for _ in range(32):
            members = np.argsort(loads + rng.random(n), kind="stable")[:k]
            cand = int(np.bitwise_or.reduce(np.left_shift(np.int64(1), members.astype(np.int64))))
            if cand not in used:
                code = cand
                break
        if code is None:
            if pool is None:
                pool = _candidate_pool(rng, n, k)
            code = _least_loaded_unused(pool, n, loads, used, rng)
        take([code])
        out.append(code)
        loads += unpack_bits(np.array([code], dtype=np.int64), n)[0]
    codes = np.array(out, dtype=np.int64)
    return codes[rng.permutation(len(codes))]


_ENUMERATE_UP_TO = 200_000


def _candidate_pool(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Every weight-k code when C(n, k) is small, else a large random sample of them."""
    if capacity(n, k) <= _ENUMERATE_UP_TO:
        from itertools import combinations

        return np.array([sum(1 << b for b in comb) for comb in combinations(range(n), k)],
                        dtype=np.int64)
    return np.unique([_random_code(rng, n, k) for _ in range(_ENUMERATE_UP_TO)])


def _least_loaded_unused(pool: np.ndarray, n: int, loads: np.ndarray, used: set[int],
                         rng: np.random.Generator) -> int:
    """The unused pool code minimising (heaviest member load, total load); random ties."""
    free = pool[np.fromiter((int(c) not in used for c in pool), bool, len(pool))]
    if len(free) == 0:
        raise CapacityError("no unused code left")  # unreachable after check_capacity
    bits = unpack_bits(free, n).astype(bool)
    heaviest = np.where(bits, loads[None, :], np.iinfo(np.int64).min).max(axis=1)
    total = (bits * loads[None, :]).sum(axis=1)
    key = heaviest * (int(loads.sum()) + 1) + total  # lexicographic (heaviest, total)
    best = np.flatnonzero(key == key.min())
    return int(free[rng.choice(best)])


def unpack_bits(codes: np.ndarray, n: int) -> np.ndarray:
    """Bitmasks (M,) int64 -> bits (M, n) uint8 with bits[m, i] = c_m,i."""
    codes = np.asarray(codes, dtype=np.int64)
    return ((codes[:, None] >> np.arange(n, dtype=np.int64)[None, :]) & 1).astype(np.uint8)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Bits (M, n) {0,1} -> bitmasks (M,) int64."""
    bits = np.asarray(bits, dtype=np.int64)
    return (bits << np.arange(bits.shape[1], dtype=np.int64)[None, :]).sum(axis=1)


def delta_w_values(n: int, k: int) -> tuple[float, float]:
    """The two entries of dw(c) = (1 - c)/(n - k) - 1/n, the weight change of ablating a code:
    (kept, dropped) = (1/(n - k) - 1/n, -1/n) for members with c_i = 0 and c_i = 1."""
    return 1.0 / (n - k) - 1.0 / n, -1.0 / n


def members_of(codes: np.ndarray) -> int:
    """S(W) = the union of S(s) over the codes (M,) int64: a bitmask of the members trained on
    any of them (0 for no code)."""
    return int(np.bitwise_or.reduce(np.asarray(codes, dtype=np.int64), initial=0))


def mask_bits(mask: int, n: int) -> np.ndarray:
    """A member bitmask -> (n,) uint8 bits."""
    return unpack_bits(np.array([mask], dtype=np.int64), n)[0]


def ablated_weights(code: int, served: int, n: int) -> np.ndarray:
    """Member weights (n,) float64 of the ensemble serving members ``served`` (a bitmask)
    with the source of ``code`` ablated: w'_i = m_i (1 - c_i) / sum_j m_j (1 - c_j). With
    code 0 these are the serving weights themselves, m / |m|; with every member served and a
    weight-k code, (1 - c)/(n - k). Raises ValueError when no served member is left."""
    kept = mask_bits(served, n).astype(np.float64) * (1.0 - mask_bits(code, n))
    total = kept.sum()
    if total == 0:
        raise ValueError(f"code {code:#x} covers every served member {served:#x}: nothing is left to serve")
    return kept / total


def member_manifests(book: CodeBook, item_sha256: Sequence[str]) -> list[str]:
    """A SHA-256 per member of its training-set manifest: the content hashes of the items it
    trains on (``member_items``), in item order, one per line. Equal hashes mean equal splits."""
    if len(item_sha256) != len(book.item_source):
        raise ValueError(f"{len(item_sha256)} item hashes for {len(book.item_source)} items")
    return [hashlib.sha256("".join(f"{item_sha256[int(j)]}\n" for j in split).encode()).hexdigest()
            for split in book.member_items()]


def satisfies_definition1(codes: np.ndarray, chunk: int = 2048) -> bool:
    """Definition 1 checked directly: for all x != x', S(x) \\ S(x') is non-empty.

    That is, no code is a subset of another one (equal codes are subsets of each other).
    O(M^2) bit operations in chunks; codes: (M,) int64.
    """
    codes = np.asarray(codes, dtype=np.int64)
    m = len(codes)
    for start in range(0, m, chunk):
        a = codes[start : start + chunk, None]
        diff_empty = (a & ~codes[None, :]) == 0  # S(a) \ S(b) empty
        rows = np.arange(start, start + len(a))
        diff_empty[np.arange(len(a)), rows] = False
        if diff_empty.any():
            return False
    return True


def validate_codes(codes: np.ndarray, n: int, k: int) -> None:
    """Raise ValueError unless codes are distinct, of weight k and within n bits.

    Distinct equal-weight codes satisfy Definition 1, so this O(M) check suffices.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if (codes < 0).any() or (codes >> n).any():
        raise ValueError(f"codes use bits beyond n={n}")
    weights = unpack_bits(codes, n).sum(axis=1)
    bad = np.flatnonzero(weights != k)
    if len(bad):
        raise ValueError(f"code of source {int(bad[0])} has weight {int(weights[bad[0]])}, not {k}")
    if len(np.unique(codes)) != len(codes):
        raise ValueError("codes are not distinct: Definition 1 would fail")


GRANULARITIES = ("item", "class", "owner")


@dataclass(frozen=True)
class CodeBook:
    """Sources, their codes and the item -> source map of one ensemble.

    Attributes:
        n, k: ensemble size and code weight.
        granularity: "item", "class" or "owner".
        source_keys: (S,) names of the sources, e.g. "item:17", "class:3", "owner:alice".
        codes: (S,) int64 bitmasks, one per source.
        item_source: (N,) int64 index into source_keys for every training item.
        withdrawn: sorted indices of sources withdrawn (opted out): no member trains on their
            items, and their codes stay reserved so that no other source ever gets them.
    """

    n: int
    k: int
    granularity: str
    source_keys: tuple[str, ...]
    codes: np.ndarray
    item_source: np.ndarray
    withdrawn: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}")
        if len(self.source_keys) != len(self.codes):
            raise ValueError("one code per source is required")
        validate_codes(self.codes, self.n, self.k)
        if list(self.withdrawn) != sorted(set(self.withdrawn)) or any(
                not 0 <= s < len(self.codes) for s in self.withdrawn):
            raise ValueError(f"withdrawn sources must be distinct, sorted indices below {len(self.codes)}")

    @property
    def num_sources(self) -> int:
        return len(self.source_keys)

    def bits(self) -> np.ndarray:
        """(S, n) uint8 code bits."""
        return unpack_bits(self.codes, self.n)

    def member_items(self) -> list[np.ndarray]:
        """For each member i, the (N_i,) item indices it trains on (its split): the items whose
        source's code has bit i set, less the items of withdrawn sources."""
        source_bits = self.bits()
        source_bits[list(self.withdrawn)] = 0
        item_bits = source_bits[self.item_source]  # (N, n)
        return [np.flatnonzero(item_bits[:, i]) for i in range(self.n)]

    def withdraw(self, sources: Sequence[int]) -> CodeBook:
        """The same code book with ``sources`` withdrawn too (codes unchanged, so Definition 1
        still holds for the sources that remain)."""
        return replace(self, withdrawn=tuple(sorted(set(self.withdrawn) | {int(s) for s in sources})))

    def active_sources(self) -> np.ndarray:
        """(S',) indices of the sources not withdrawn."""
        keep = np.ones(self.num_sources, dtype=bool)
        keep[list(self.withdrawn)] = False
        return np.flatnonzero(keep)

    def source_items(self, s: int) -> np.ndarray:
        """Item indices that belong to source s."""
        return np.flatnonzero(self.item_source == s)


def make_codebook(
    num_items: int,
    n: int,
    k: int | None = None,
    *,
    seed: int = 0,
    granularity: str = "item",
    labels: Sequence[int] | np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    owners: Sequence[str] | None = None,
) -> CodeBook:
    """Group items into sources by ``granularity`` and give each source its own code.

    Raises CapacityError when the sources do not fit, and ValueError when a member would
    train on no item at all (too few sources for n).
    """
    k = default_k(n) if k is None else k
    if granularity == "item":
        keys = [f"item:{i}" for i in range(num_items)]
        item_source = np.arange(num_items, dtype=np.int64)
    elif granularity in ("class", "owner"):
        groups = labels if granularity == "class" else owners
        if groups is None:
            need = "labels" if granularity == "class" else "owners"
            raise ValueError(f"granularity '{granularity}' needs {need}")
        groups_arr = np.asarray(groups)
        if len(groups_arr) != num_items:
            raise ValueError(f"{len(groups_arr)} {granularity} entries for {num_items} items")
        uniq, inverse = np.unique(groups_arr, return_inverse=True)
        if granularity == "class" and label_names is not None:
            names = [str(label_names[int(u)]) for u in uniq]
        else:
            names = [str(u) for u in uniq]
        keys = [f"{granularity}:{name}" for name in names]
        item_source = inverse.astype(np.int64)
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not '{granularity}'")
    codes = assign_codes(len(keys), n, k, seed)
    book = CodeBook(n, k, granularity, tuple(keys), codes, item_source)
    empty = [i for i, idx in enumerate(book.member_items()) if len(idx) == 0]
    if empty:
        raise ValueError(
            f"members {empty} would train on no item: {len(keys)} sources are too few for "
            f"n={n}; use a smaller n or finer sources"
        )
    return book


def balanced_codes(num_sources: int, n: int) -> np.ndarray:
    """Weight-n/2 codes whose pairwise overlaps are all exactly n/4 (for the class control).

    Rows of the Sylvester-Hadamard matrix H_n (+1 -> bit 1) other than the all-ones row: any
    two overlap in exactly n/4 members. Ablating another class c' then removes exactly half
    of the members that know a sample's class p (and half of those that do not), so the
    remaining ensemble knows p in the same proportion as the full one, while ablating p
    removes every member that knows it. With random codes the overlap varies from 1 to
    k - 1, and a high-overlap class's ablation is nearly an ablation of p (measured on
    digits: median distance at overlap 7 equal to the predicted class's). Member 0 trains on
    every class (column 0 of H_n is all ones). Of the n - 1 rows, the ``num_sources`` with
    the most even member loads are used.

    n must be a power of two >= 4 and num_sources <= n - 1. Returns (num_sources,) int64.
    """
    if n < 4 or n & (n - 1):
        raise ValueError(f"balanced codes need n a power of two >= 4, not {n}")
    if num_sources > n - 1:
        raise ValueError(f"balanced codes of length {n} hold at most {n - 1} sources, not {num_sources}")
    H = np.ones((1, 1), dtype=np.int64)
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    rows = (H[1:] > 0).astype(np.int64)  # (n - 1, n), weight n/2 each
    chosen: list[int] = []
    for _ in range(num_sources):  # greedy: keep member loads (column sums) as even as possible
        loads = rows[chosen].sum(axis=0) if chosen else np.zeros(n, np.int64)
        cost = [(float(np.var(loads + rows[r])), r) for r in range(n - 1) if r not in chosen]
        chosen.append(min(cost)[1])
    bits = rows[sorted(chosen)]
    return (bits << np.arange(n, dtype=np.int64)).sum(axis=1).astype(np.int64)
