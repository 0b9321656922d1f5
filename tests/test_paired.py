"""Paired exact references: the model's KL against the exact window-k predictor on the same held-out
sequences, so that "model − floor" has a paired SE and is 0 for a model that is the floor."""

import pytest
import torch

from l2m.data.gaussian import GaussianDataModule
from l2m.evaluation import analyse_state, evaluate_positionwise, paired_reference
from l2m.models import GPTConfig, build_model
from l2m.models.adapters import GaussianOutput
from l2m.training.callbacks import heldout_batches, history_state_summary


class RegressionOnTheLastTokens(torch.nn.Module):
    """The best predictor that sees the last k tokens, by a direct solve of Σ per position (not the
    family's code), with its mean shifted by `shift`; it reads the batch as SequenceModel.losses does."""

    def __init__(self, data: GaussianDataModule, k: int, shift: float = 0.0):
        super().__init__()
        self.k, self.shift, self.receptive_field = k, shift, k
        self.decoder = GaussianOutput(data.family.copies, 8)  # its losses only: the KL the models are scored by
        cov = data.family.covariance
        L = cov.shape[0]
        self.weights = torch.zeros(L, L, dtype=torch.float64)  # mean_i = Σ_j W_ij z_j over the last k
        self.std = torch.zeros(L, dtype=torch.float64)
        for i in range(L):
            given = list(range(max(0, i - k), i))
            if given:
                self.weights[i, given] = torch.linalg.solve(cov[given][:, given], cov[given, i])
            self.std[i] = (cov[i, i] - self.weights[i] @ cov[:, i]).sqrt()

    def predict(self, batch):
        z = batch["x"][:, 1:].double()  # (B, L, copies)
        return torch.einsum("ij,bjc->bic", self.weights, z) + self.shift, self.std[None, :, None].expand_as(z[:1])

    def losses(self, batch):
        return self.decoder.losses(self.predict(batch), batch)

    def bound_state_size(self, n_past):
        return min(n_past, self.k)


@pytest.fixture(scope="module")
def data():
    data = GaussianDataModule(levels=3, copies=4, val_size=48, batch_size=16)
    data.setup("validate")
    return data


def measured(model, data):
    metrics = evaluate_positionwise(model, heldout_batches(data, "cpu"), data.nll_floor(), keep_heldout=True)
    return metrics, analyse_state(metrics, model, data, windows=(1, 4, 16))


def test_the_exact_window_predictor_lands_on_its_floor(data):
    metrics, analysis = measured(RegressionOnTheLastTokens(data, 4), data)
    s = analysis.summary
    assert s["paired_references"] and s["floor_reference"] == "window4"
    assert abs(s["kl_minus_floor"]) < 1e-9 and s["kl_minus_floor_se"] < 1e-8
    assert s["state_limited"] and not s["training_limited"] and "window4" in s["on_references"]
    assert s["effective_context"] == 4 and s["utilization"] == 4 / 64
    # the floor on these sequences is the model's own KL; its expectation is window_kl(4)
    torch.testing.assert_close(analysis.heldout_references["heldout_window4"], metrics.kl, rtol=0, atol=1e-9)
    expected, se = float(data.window_kl(4).mean()), metrics.avg_stderr["kl"]
    assert s["heldout_window_kl"]["4"] == pytest.approx(expected, abs=4 * se)
    # a sample, not the expectation: the unpaired difference is off by sampling noise, which pairing removes
    assert abs(metrics.kl.mean() - expected) > 1e3 * abs(s["kl_minus_floor"])
    # windows it sees less than it: above them by many SEs; more than it: below
    for k, (difference, se) in s["kl_minus_window"].items():
        if k != "4":
            assert (difference < -3 * se) if int(k) < 4 else (difference > 3 * se), (k, difference, se)


def test_a_known_perturbation_of_the_floor_is_measured_with_its_paired_se(data):
    shift = 0.1
    model = RegressionOnTheLastTokens(data, 4, shift)
    metrics, analysis = measured(model, data)
    s = analysis.summary
    # per sequence: KL(p || q + δ) − KL(p || q) = (δ² − 2δ(μ_p − μ_q)) / (2σ_q²), summed over copies
    exact = []
    for batch in heldout_batches(data, "cpu"):
        mean_q, std_q = RegressionOnTheLastTokens(data, 4).predict(batch)
        per_token = ((shift**2 - 2 * shift * (batch["mean"].double() - mean_q)) / (2 * std_q**2)).sum(-1)
        exact.append(per_token.mean(1))
    exact = torch.cat(exact)
    assert s["kl_minus_floor"] == pytest.approx(float(exact.mean()), rel=1e-5)
    assert s["kl_minus_floor_se"] == pytest.approx(float(exact.std() / len(exact) ** 0.5), rel=1e-3)
    # its expectation: δ²/2 Σ_copies 1/σ_q², averaged over positions
    expectation = float((4 * shift**2 / (2 * model.std**2)).mean())
    assert s["kl_minus_floor"] == pytest.approx(expectation, abs=3 * s["kl_minus_floor_se"])
    assert s["kl_minus_floor"] > 2 * s["kl_minus_floor_se"]
    assert s["kl_minus_floor"] > 0.02 * s["window_avg_kl"]["4"]  # beyond floor_tolerance of it, too
    assert s["training_limited"] and not s["state_limited"] and "window4" not in s["on_references"]


def test_a_model_significantly_but_slightly_above_its_floor_still_sits_on_it(data):
    s = measured(RegressionOnTheLastTokens(data, 4, shift=0.02), data)[1].summary
    assert 2 * s["kl_minus_floor_se"] < s["kl_minus_floor"] < 0.02 * s["window_avg_kl"]["4"]
    assert "window4" not in s["on_references"]  # detectably above it, on these 48 sequences
    assert s["state_limited"] and not s["training_limited"]  # but within floor_tolerance: the window binds


def test_an_unbounded_model_is_held_to_the_exact_conditional_and_the_state_bound(data):
    model = RegressionOnTheLastTokens(data, 63)  # the whole past, as a full-context model sees it
    model.receptive_field = None
    metrics, analysis = measured(model, data)
    s = analysis.summary
    assert s["floor_reference"] == "exact" and s["kl_minus_floor"] == pytest.approx(float(metrics.kl.mean()))
    assert s["kl_minus_floor"] < 1e-5 and s["effective_context"] <= 63
    assert s["bound_half"] == pytest.approx(data.state_bound(32, 32)) and s["state_limited"] is not None


def test_paired_references_need_the_kept_batches(data):
    model = RegressionOnTheLastTokens(data, 1)
    metrics = evaluate_positionwise(model, heldout_batches(data, "cpu"), data.nll_floor())
    with pytest.raises(ValueError, match="keep_heldout=True"):
        paired_reference(metrics, model, lambda batch: data.window_prediction(1, batch))
    # without them the analysis falls back to the references' expectations
    s = analyse_state(metrics, model, data).summary
    assert not s["paired_references"] and s["kl_minus_floor_se"] is None and s["kl_minus_window"] == {}


def test_a_window_of_one_token_keeps_no_state_and_is_still_summarized(data):
    # attention to itself only: nothing of the past reaches the future, I_BP / dim(z) is no number
    model = build_model(GPTConfig(n_layer=1, d_model=16, n_head=2, window=1), data.io_config())
    summary = history_state_summary(model, data)
    assert summary["dim_z_half"] == 0 and summary["ratio"] is None and summary["receptive_field"] == 1
    assert summary["i_bp_half"] == pytest.approx(data.bipartite_mi_half())


class BestLinearState(torch.nn.Module):
    """The best predictor that reads z_1..z_split only through d scalars linear in them, built here
    from Σ by a generalised eigenproblem and direct solves per position (not the family's code): the
    d leading canonical directions over all copies, then regression of each z_i after the split on
    [the state, z_split+1..z_i-1]; before the split, on the whole past. Its mean is shifted by `shift`."""

    def __init__(self, data: GaussianDataModule, d: int, split: int, shift: float = 0.0):
        import scipy.linalg

        super().__init__()
        self.d, self.shift, self.receptive_field = d, shift, None
        self.decoder = GaussianOutput(data.family.copies, 8)
        cov = data.family.covariance
        L, copies = cov.shape[0], data.family.copies
        sxx, sxy, syy = (m.numpy() for m in (cov[:split, :split], cov[:split, split:], cov[split:, split:]))
        eigenvalues, vectors = scipy.linalg.eigh(sxy @ scipy.linalg.solve(syy, sxy.T), sxx)  # ρ², ascending
        directions = torch.from_numpy(vectors[:, ::-1].copy())  # (split, split), leading first
        self.weights = torch.zeros(copies, L, L, dtype=torch.float64)  # mean_i = Σ_j W_ij z_j, per copy
        self.std = torch.zeros(copies, L, dtype=torch.float64)
        for copy in range(copies):
            carried = len(range(copy, d, copies))  # ρ_1 of every copy, then ρ_2 of every copy, ...
            for i in range(L):
                given = torch.eye(L, dtype=torch.float64)[:i]  # rows: the variables it reads, as vectors over z
                if i >= split:
                    state = torch.zeros(carried, L, dtype=torch.float64)
                    state[:, :split] = directions[:, :carried].T
                    given = torch.cat([state, given[split:]])
                if len(given):
                    coefficients = torch.linalg.solve(given @ cov @ given.T, given @ cov[:, i])
                    self.weights[copy, i] = coefficients @ given
                self.std[copy, i] = (cov[i, i] - self.weights[copy, i] @ cov[:, i]).sqrt()

    def losses(self, batch):
        z = batch["x"][:, 1:].double()  # (B, L, copies)
        mean = torch.einsum("cij,bjc->bic", self.weights, z) + self.shift
        return self.decoder.losses((mean, self.std.T[None]), batch)

    def bound_state_size(self, n_past):
        return self.d


# none; two or one direction per copy; seven or six (ρ_4 = ρ_5 = ρ_6 here: a state that cuts that
# block is optimal along any of its directions, and one chosen elsewhere differs on each sequence)
@pytest.mark.parametrize("d", [0, 6, 26])
def test_the_best_linear_state_lands_on_its_paired_reference(data, d):
    metrics, analysis = measured(BestLinearState(data, d, 32), data)
    s = analysis.summary
    assert abs(s["kl_minus_linear_state"]) < 1e-9 and s["kl_minus_linear_state_se"] < 1e-8
    assert "linear_state" in s["on_references"] and s["state_limited"] and not s["training_limited"]
    # on these sequences the reference is the model's own tail KL; its expectation is the bound
    torch.testing.assert_close(analysis.heldout_references["heldout_linear_state"], metrics.kl, rtol=0, atol=1e-9)
    assert s["heldout_linear_state_kl"] == pytest.approx(s["tail_kl_half"], abs=1e-9)
    assert s["bound_half"] == pytest.approx(data.state_bound(d, 32), rel=1e-12)
    sequences = torch.cat([c[:, 32:].sum(1) for c in metrics.heldout.kl])  # each held-out sequence's tail KL
    assert s["heldout_linear_state_kl"] == pytest.approx(s["bound_half"], abs=4 * float(sequences.std()) / len(sequences) ** 0.5)


def test_a_shifted_linear_state_is_measured_above_its_reference_with_its_paired_se(data):
    shift = 0.2
    model = BestLinearState(data, 6, 32, shift)
    s = measured(model, data)[1].summary
    # each sequence's tail: Σ_{i > split, copies} (δ² − 2δ(μ_p − μ_q)) / (2σ_q²), as for the window floor
    exact, reference = [], BestLinearState(data, 6, 32)
    for batch in heldout_batches(data, "cpu"):
        z = batch["x"][:, 1:].double()
        mean_q = torch.einsum("cij,bjc->bic", reference.weights, z)
        per_token = (shift**2 - 2 * shift * (batch["mean"].double() - mean_q)) / (2 * reference.std.T[None] ** 2)
        exact.append(per_token[:, 32:].sum((1, 2)))
    exact = torch.cat(exact)
    assert s["kl_minus_linear_state"] == pytest.approx(float(exact.mean()), rel=1e-5)
    assert s["kl_minus_linear_state_se"] == pytest.approx(float(exact.std() / len(exact) ** 0.5), rel=1e-3)
    assert s["kl_minus_linear_state"] > 0.1 * s["bound_half"] and "linear_state" not in s["on_references"]
    assert not s["state_limited"]


def test_the_linear_state_predictions_tail_kl_is_the_linear_state_bound_exactly(data):
    family, x = data.family, data.family.sample(3)
    for d, split in [(0, 32), (5, 20), (13, 50), (1000, 32)]:  # 1000: every direction, the exact conditional
        _, std = family.linear_state_prediction(d, x, split)
        # a Gaussian predictor's expected KL_i: ½ log(σ²_q / σ²_p), its mean's error adding σ²_q − σ²_p
        expected_tail = float((std[0, split:].log() - family.conditional_std[split:, None].log()).sum())
        assert expected_tail == pytest.approx(family.linear_state_bound(d, split), rel=1e-10, abs=1e-10)
    assert family.linear_state_bound(0, 32) == pytest.approx(family.bipartite_mi(), rel=1e-10)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 65, 4\)"):
        family.linear_state_prediction(2, x[:, 1:])
