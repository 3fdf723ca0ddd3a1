import random

import numpy as np
import pytest

from microlm.data.dedup import (
    Deduplicator,
    MinHasher,
    SortedRunIndex,
    band_keys,
    candidate_probability,
    estimate_jaccard,
    jaccard,
    optimal_bands,
)

from .conftest import ZH


def edit(text: str, n: int, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(n):
        chars[rng.randrange(len(chars))] = "某"
    return "".join(chars)


def long_doc(rng: random.Random, n=300) -> str:
    alphabet = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_signature_is_independent_of_batch_composition():
    mh = MinHasher(128, 5, seed=3)
    alone = mh.signatures([ZH[0]])
    in_batch = mh.signatures(["短", ZH[1], ZH[0], "x" * 1000])[2]
    assert alone.shape == (1, 128) and alone.dtype == np.uint32
    assert np.array_equal(alone[0], in_batch)


def test_signature_deterministic_across_instances_and_seed_sensitive():
    a = MinHasher(128, 5, seed=1).signatures(ZH)
    b = MinHasher(128, 5, seed=1).signatures(ZH)
    c = MinHasher(128, 5, seed=2).signatures(ZH)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_estimate_is_unbiased_against_exact_jaccard():
    rng = random.Random(0)
    mh = MinHasher(128, 5)
    errs = []
    for _ in range(300):
        a = long_doc(rng, rng.randint(60, 600))
        b = edit(a, rng.randint(1, len(a) // 6), rng)
        sa, sb = mh.signatures([a, b])
        errs.append(estimate_jaccard(sa, sb) - jaccard(a, b))
    errs = np.array(errs)
    assert abs(errs.mean()) < 0.01
    assert errs.std() < 0.06  # classic MinHash with K=128: sqrt(J(1-J)/K) <= 0.044


def test_short_documents_are_densified_and_identical_texts_match():
    mh = MinHasher(128, 5)
    s = mh.signatures(["短文本", "短文本", "完全不同的句子"])
    assert (s[0] == s[1]).all()
    assert estimate_jaccard(s[0], s[2]) < 0.2
    assert s.max() < 2**32  # no EMPTY sentinel left


def test_disjoint_documents_estimate_near_zero():
    mh = MinHasher(128, 5)
    s = mh.signatures([ZH[0], ZH[2]])
    assert estimate_jaccard(s[0], s[1]) < 0.1


def test_optimal_bands_cover_threshold():
    b, r = optimal_bands(0.8, 128)
    assert b * r == 128
    assert candidate_probability(0.85, b, r) > 0.99
    assert candidate_probability(0.3, b, r) < 0.01


def test_sorted_run_index_is_a_multimap():
    idx = SortedRunIndex()
    rng = np.random.default_rng(0)
    truth = {}
    for batch in range(20):
        keys = rng.integers(0, 500, size=50).astype(np.uint64)
        vals = np.arange(batch * 50, batch * 50 + 50, dtype=np.int32)
        idx.add(keys, vals)
        for k, v in zip(keys.tolist(), vals.tolist(), strict=True):
            truth.setdefault(k, set()).add(v)
    q = np.array([0, 7, 499, 10**9], dtype=np.uint64)
    qi, v = idx.lookup(q)
    got = {}
    for a, b in zip(qi.tolist(), v.tolist(), strict=True):
        got.setdefault(int(q[a]), set()).add(b)
    assert got == {k: truth[k] for k in (0, 7, 499) if k in truth}
    assert len(idx) == 1000 and idx.nbytes == 1000 * 12
    assert len(idx._runs) <= 11  # LSM merging keeps the number of runs logarithmic


def test_deduplicator_keeps_first_and_finds_planted_duplicates_across_batches():
    rng = random.Random(1)
    mh = MinHasher(128, 5)
    base = [long_doc(rng, 400) for _ in range(200)]
    near = [edit(d, 4, rng) for d in base[:50]]
    assert min(jaccard(a, b) for a, b in zip(base, near, strict=False)) > 0.85
    docs = base + near + base[50:60]  # 10 exact duplicates at the end
    dd = Deduplicator(threshold=0.8, num_perm=128)
    keep, reasons, matches = [], [], []
    for i in range(0, len(docs), 64):  # several batches: cross-batch and in-batch matches
        chunk = docs[i : i + 64]
        keys = np.array([hash(d) & (2**63 - 1) for d in chunk], dtype=np.uint64)
        dec = dd.process(keys, mh.signatures(chunk))
        keep += dec.keep.tolist()
        reasons += dec.reason
        matches += dec.match.tolist()
    assert all(keep[:200]), "first occurrences are kept"
    assert reasons[200:250].count("near_duplicate") >= 48
    assert all(m == j for m, j in zip(matches[200:250], range(50), strict=False) if m >= 0)
    assert reasons[250:] == ["exact_duplicate"] * 10
    assert dd.n_kept == sum(keep)


def test_unverified_lsh_flags_more_than_verified():
    rng = random.Random(2)
    mh = MinHasher(128, 5)
    a = long_doc(rng, 400)
    b = edit(a, 90, rng)  # Jaccard well under 0.8 but likely shares a band
    sim = jaccard(a, b)
    sigs = mh.signatures([a, b])
    keys = np.array([1, 2], dtype=np.uint64)
    strict = Deduplicator(threshold=0.8, bands=32).process(keys, sigs)
    assert sim < 0.7 and strict.keep.all()


def test_band_keys_shape_and_equality():
    sig = MinHasher(128, 5).signatures([ZH[0], ZH[0], ZH[1]])
    k = band_keys(sig, 16)
    assert k.shape == (3, 16) and k.dtype == np.uint64
    assert (k[0] == k[1]).all() and not (k[0] == k[2]).any()


@pytest.mark.parametrize("bad", [100, 0])
def test_num_perm_must_be_power_of_two(bad):
    with pytest.raises(ValueError):
        MinHasher(bad)
