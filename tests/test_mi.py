"""l2m.mi: entropy estimators, streaming counts, two-point MI, exact sources, scorers, bipartite MI."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from l2m.mi import (
    ExactScorer,
    MarkovChain,
    MarkovMixture,
    ModelScorer,
    PairCounter,
    bipartite_mi,
    check_tokenizer,
    fit_decay_with_offset,
    grassberger_entropy,
    naive_entropy,
    two_point_mi,
)
from l2m.mi.entropy import grassberger_g
from l2m.mi.synthetic import example_source

CHAIN = example_source("markov")
# Each sequence is either "sticky" or "switchy": the latent links X and Y, so I_BP grows with L.
MIXTURE = example_source("mixture")


# --- entropy -------------------------------------------------------------------------------
def test_grassberger_g_reference_values():
    # G(1) = −γ − log 2, G(2) = 2 − γ − log 2 (Grassberger 2003); G(n) → log n for large n.
    gamma = 0.5772156649015329
    assert grassberger_g(1) == pytest.approx(-gamma - math.log(2), rel=1e-12)
    assert grassberger_g(2) == pytest.approx(2 - gamma - math.log(2), rel=1e-12)
    assert grassberger_g(10_000) == pytest.approx(math.log(10_000), abs=1e-4)


def test_grassberger_less_biased_than_naive_on_zipf():
    rng = np.random.default_rng(0)
    ranks = np.arange(1, 2001)
    p = ranks**-1.1 / np.sum(ranks**-1.1)
    truth = -np.sum(p * np.log(p))
    counts = rng.multinomial(1000, p, size=200)
    naive = np.array([naive_entropy(c)[0] for c in counts])
    grass = np.array([grassberger_entropy(c)[0] for c in counts])
    bias_naive, bias_grass = naive.mean() - truth, grass.mean() - truth
    assert bias_naive < -0.3  # the plug-in estimator is badly biased low here
    assert abs(bias_grass) < 0.5 * abs(bias_naive)
    # The delta-method standard error matches the spread over repetitions.
    se = np.mean([naive_entropy(c)[1] for c in counts])
    assert se == pytest.approx(naive.std(ddof=1), rel=0.25)


def test_entropy_of_large_sample_is_exact():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    counts = (p * 2**20).astype(np.int64)
    for estimator in (naive_entropy, grassberger_entropy):
        h, se = estimator(counts)
        assert h == pytest.approx(1.75 * math.log(2), abs=1e-5)
        assert 0 < se < 1e-3


@pytest.mark.parametrize("counts", [[], [0, 0], [3, -1], [1.5, 2.0]])
def test_entropy_bad_counts(counts):
    with pytest.raises(ValueError, match="counts"):
        grassberger_entropy(counts)


# --- streaming counts and two-point MI --------------------------------------------------------
def test_streaming_counts_equal_brute_force():
    rng = np.random.default_rng(1)
    vocab, distances = 97, [1, 3, 8]
    docs = [rng.integers(0, vocab, rng.integers(1, 60)) for _ in range(300)]
    counter = PairCounter(vocab, distances, chunk_tokens=500)  # many merges
    for doc in docs:
        counter.update(doc)
    assert counter.n_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(counter.unigrams, np.bincount(np.concatenate(docs), minlength=vocab))
    for d in distances:
        truth = Counter((int(a), int(b)) for doc in docs for a, b in zip(doc[:-d], doc[d:]))
        keys, counts = counter.pairs(d)
        assert np.all(np.diff(keys) > 0)
        assert {(int(k) // vocab, int(k) % vocab): int(c) for k, c in zip(keys, counts)} == truth


def test_pair_counter_bad_input():
    with pytest.raises(ValueError, match="distances"):
        PairCounter(10, [0, 1])
    counter = PairCounter(10, [1])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        counter.update([3, 10])
    with pytest.raises(ValueError, match="distance 2 was not counted"):
        counter.pairs(2)


def test_two_point_mi_matches_exact_source():
    samples = MIXTURE.sample(2000, 64, torch.Generator().manual_seed(0)).numpy()
    counter = PairCounter(MIXTURE.vocab_size, [1, 2, 4, 8])
    for row in samples:
        counter.update(row)
    for d in (1, 2, 4, 8):
        mi, se = two_point_mi(counter, d)
        assert abs(mi - MIXTURE.two_point_mi(d)) < 3 * se, d
    assert MIXTURE.two_point_mi(1) > MIXTURE.two_point_mi(8) > 0


def test_decay_fit_recovers_alpha_and_offset():
    d = 2.0 ** np.arange(13)
    exact = fit_decay_with_offset(d, 0.4 * d**-0.7 + 0.01)
    assert (exact.alpha, exact.amplitude, exact.offset) == pytest.approx((0.7, 0.4, 0.01), rel=1e-5)
    noisy = 0.4 * d**-0.7 + 0.01
    noisy = noisy * np.exp(np.random.default_rng(0).normal(0, 0.02, d.size))
    fit = fit_decay_with_offset(d, noisy)
    assert abs(fit.alpha - 0.7) < 3 * fit.alpha_stderr + 0.02
    assert abs(fit.offset - 0.01) < 3 * fit.offset_stderr + 1e-3
    assert fit(1.0) == pytest.approx(fit.amplitude + fit.offset)
    # A pure power law is fitted with C at its bound 0.
    assert fit_decay_with_offset(d, 2 * d**-0.5).offset == pytest.approx(0, abs=1e-6)


def test_decay_fit_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        fit_decay_with_offset([1, 2], [1, 0.5])
    with pytest.raises(ValueError, match="positive"):
        fit_decay_with_offset([1, 2, 4], [1, 0.5, -0.1])


# --- exact sources ------------------------------------------------------------------------
def test_chain_closed_forms_equal_enumeration():
    for ell, seq_len in [(1, 2), (2, 5), (3, 6)]:
        assert CHAIN.bipartite_mi(ell, seq_len) == pytest.approx(MarkovMixture.bipartite_mi(CHAIN, ell, seq_len), rel=1e-10)
        assert CHAIN.vclub_limit(ell, seq_len) == pytest.approx(MarkovMixture.vclub_limit(CHAIN, ell, seq_len), rel=1e-10)


def test_mixture_probabilities_and_samples():
    seqs = torch.tensor(list(itertools.product(range(2), repeat=4)))
    probs = MIXTURE.log_prob(seqs).sum(1).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(probs.numpy(), np.exp(MIXTURE._log_prob_all(4)), rtol=1e-12)
    # Empirical block frequencies of samples agree with the exact probabilities.
    samples = MIXTURE.sample(20000, 4, torch.Generator().manual_seed(3))
    index = (samples * torch.tensor([8, 4, 2, 1])).sum(1)
    freq = torch.bincount(index, minlength=16).double() / 20000
    se = (probs * (1 - probs) / 20000).sqrt()
    assert torch.all((freq - probs).abs() < 4 * se)
    # The latent makes I_BP grow with L; vCLUB's limit sits above it (CLUB is an upper bound).
    mi = [MIXTURE.bipartite_mi(L // 2, L) for L in (4, 8, 16)]
    # I(X;Y) ≤ H(K) + I(X;Y|K) ≤ log 2 + max_k I_k(W_ℓ; W_ℓ+1)
    assert mi[0] < mi[1] < mi[2] < math.log(2) + max(MarkovChain(p).two_point_mi(1) for p in MIXTURE.transitions)
    assert MIXTURE.vclub_limit(4, 8) > MIXTURE.bipartite_mi(4, 8)


def test_source_bad_input():
    with pytest.raises(ValueError, match="row-stochastic"):
        MarkovChain([[0.5, 0.6], [0.5, 0.5]])
    with pytest.raises(ValueError, match="weights"):
        MarkovMixture(MIXTURE.transitions, weights=[0.2, 0.2])
    with pytest.raises(ValueError, match="split ell"):
        MIXTURE.bipartite_mi(4, 4)
    with pytest.raises(ValueError, match="enumerate"):
        MIXTURE.bipartite_mi(20, 40)


# --- bipartite estimators on exact sources -----------------------------------------------------
@pytest.mark.parametrize("source", [CHAIN, MIXTURE], ids=["chain", "mixture"])
def test_estimators_agree_with_exact_values(source):
    generator = torch.Generator().manual_seed(0)
    samples = source.sample(4000, 16, generator)
    counter = PairCounter(source.vocab_size, [1])
    for row in samples.numpy():
        counter.update(row)
    scorer = ExactScorer(source)
    with pytest.warns(UserWarning, match="dropped 2 of 9 splits"):  # ℓ = 8 needs L = 24, 32
        result = bipartite_mi(scorer, samples, splits=[2, 4, 8], bigram_entropy=grassberger_entropy(counter.pairs(1)[1]), generator=generator)
    assert result.dropped == [(8, 24), (8, 32)]
    assert [(s.ell, s.seq_len) for s in result.splits] == [(2, 4), (2, 6), (2, 8), (4, 8), (4, 12), (4, 16), (8, 16)]
    for s in result.splits:
        truth, club = source.bipartite_mi(s.ell, s.seq_len), source.vclub_limit(s.ell, s.seq_len)
        assert abs(s.direct - truth) < 3 * s.direct_se, s
        assert abs(s.direct_uncorrected - truth) < 3 * s.direct_uncorrected_se, s
        assert abs(s.vclub - club) < 3 * s.vclub_se, s
    # Forward passes: one unsplit pass, then two per distinct ℓ, for every sample.
    assert result.passes == scorer.sequences == 4000 * (1 + 2 * 3)
    assert result.tokens == 4000 * (16 + (6 + 8) + (12 + 16) + (8 + 16))
    assert result.passes_paper == 4000 * (5 + 2 * 7)  # lengths 4, 6, 8, 12, 16; seven splits
    assert result.tokens_paper == 4000 * ((4 + 6 + 8 + 12 + 16) + (6 + 10 + 14 + 12 + 20 + 28 + 24))
    assert set(result.fits["direct"]) == {2, 3, 4}


def test_mixture_beta_is_positive_chain_beta_is_zero():
    generator = torch.Generator().manual_seed(1)
    fits = {}
    for name, source in [("chain", CHAIN), ("mixture", MIXTURE)]:
        result = bipartite_mi(ExactScorer(source), source.sample(3000, 16, generator), ratios=(2,), generator=generator)
        fits[name] = result.fits["direct_uncorrected"][2]
    assert abs(fits["chain"]["beta"]) < 3 * fits["chain"]["beta_se"] + 0.05
    assert fits["mixture"]["beta"] > 0.5


def test_bipartite_bad_input():
    scorer = ExactScorer(CHAIN)
    samples = CHAIN.sample(8, 6)
    with pytest.raises(ValueError, match="shorter than every split"), pytest.warns(UserWarning, match="dropped 3 of 3"):
        bipartite_mi(scorer, samples, splits=[4])
    with pytest.raises(ValueError, match="ratios"):
        bipartite_mi(scorer, samples, ratios=(1,))
    with pytest.raises(ValueError, match="N ≥ 2"):
        bipartite_mi(scorer, samples[:1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        scorer(torch.tensor([[0, 3]]))


# --- scorers -------------------------------------------------------------------------------
def test_model_scorer_shifts_inputs_after_bos():
    """A 'model' returning the chain's exact next-token logits scores exactly like the source."""
    v = CHAIN.vocab_size
    log_start = torch.from_numpy(np.log(CHAIN.stationary[0]))
    table = torch.full((v + 1, v + 1), -math.inf, dtype=torch.float64)  # row = input id; BOS = v
    table[:v, :v] = torch.from_numpy(np.log(CHAIN.transitions[0]))
    table[v, :v] = log_start
    scorer = ModelScorer(lambda ids: table[ids], vocab_size=v + 1, bos_id=v, batch_size=3)
    samples = CHAIN.sample(7, 9, torch.Generator().manual_seed(0))
    torch.testing.assert_close(scorer(samples), CHAIN.log_prob(samples))
    assert (scorer.sequences, scorer.tokens) == (7, 63)


def test_hf_scorer_from_local_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from l2m.mi import load_hf_scorer

    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=49)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    scorer = load_hf_scorer(str(tmp_path), batch_size=2)
    assert (scorer.vocab_size, scorer.bos_id, scorer.max_len) == (50, 49, 31)
    ids = torch.randint(0, 49, (3, 10), generator=torch.Generator().manual_seed(0))
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = model(torch.cat([torch.full((3, 1), 49), ids[:, :-1]], 1)).logits
    expected = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0].double()
    torch.testing.assert_close(scorer(ids), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the scorer's context"):
        scorer(torch.zeros(1, 40, dtype=torch.long))


def test_tokenizer_must_match_scorer():
    class Tok:
        name, vocab_size = "byte", 259

    scorer = ModelScorer(lambda ids: None, vocab_size=50432, bos_id=0)
    with pytest.raises(ValueError, match="tokenizer 'byte' has 259 tokens but the scorer's vocabulary has 50432"):
        check_tokenizer(Tok(), scorer)
    Tok.vocab_size = 50277  # GPT-NeoX: the model pads its embedding table to 50,432 rows
    check_tokenizer(Tok(), scorer)
    Tok.vocab_size = 50433
    with pytest.raises(ValueError, match="has 50433 tokens"):
        check_tokenizer(Tok(), scorer)


# --- standard errors calibrated on replicate data sets -------------------------------------------
# Over many independent data sets from a known law, the spread (SD) of the estimates and the mean
# of the standard errors reported for each data set must agree within 25%. Seeds are fixed; the
# replicate counts keep the sampling noise of the spread itself near 5%.

def _calibration(estimates, stderrs) -> float:
    return float(np.mean(stderrs) / np.std(estimates, ddof=1))


@pytest.mark.parametrize("exponent", [0.0, 1.0], ids=["uniform", "zipf"])
@pytest.mark.parametrize("entropy", [grassberger_entropy, naive_entropy], ids=["grassberger", "naive"])
def test_entropy_standard_errors_are_calibrated_on_sparse_tables(entropy, exponent):
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 50_001) ** exponent  # 20,000 draws over 50,000 bins
    results = [entropy(rng.multinomial(20_000, p / p.sum())) for _ in range(300)]
    assert _calibration(*zip(*results)) == pytest.approx(1.0, abs=0.25)


def test_vclub_and_direct_standard_errors_are_calibrated():
    scorer, vclub, direct = ExactScorer(MIXTURE), [], []
    for seed in range(200):
        generator = torch.Generator().manual_seed(seed)
        result = bipartite_mi(scorer, MIXTURE.sample(2048, 16, generator), splits=[4], ratios=(4,), generator=generator)
        (split,) = result.splits
        vclub.append((split.vclub, split.vclub_se))
        direct.append((split.direct_uncorrected, split.direct_uncorrected_se))
    assert _calibration(*zip(*vclub)) == pytest.approx(1.0, abs=0.25)
    assert _calibration(*zip(*direct)) == pytest.approx(1.0, abs=0.25)


@pytest.mark.parametrize("d", [1, 8])
def test_two_point_standard_error_is_calibrated_on_dependent_documents(d):
    # Each document of the mixture is all sticky or all switchy: its pairs are far from independent.
    results = []
    for seed in range(100):
        counter = PairCounter(MIXTURE.vocab_size, [d])
        for document in MIXTURE.sample(2000, 64, torch.Generator().manual_seed(seed)).numpy():
            counter.update(document)
        results.append(two_point_mi(counter, d))
    assert _calibration(*zip(*results)) == pytest.approx(1.0, abs=0.25)


def test_pair_counter_groups_partition_the_pairs():
    counter = PairCounter(3, [1, 2], groups=4, block_tokens=5)
    for document in CHAIN.sample(7, 12, torch.Generator().manual_seed(0)).numpy():
        counter.update(document)
    keys, counts = counter.pairs(1)
    group_keys, groups, group_counts = counter.group_pairs(1)
    assert counter.n_blocks == 7 * 3 and set(groups.tolist()) == {0, 1, 2, 3}
    assert counts.sum() == group_counts.sum() == 7 * 11
    for key, count in zip(keys, counts):
        assert group_counts[group_keys == key].sum() == count
    with pytest.raises(ValueError, match="overflows"):
        PairCounter(2**31, [1], groups=16)
