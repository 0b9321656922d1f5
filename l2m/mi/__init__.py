"""Mutual-information math: power-law fits, entropy estimators, bipartite and two-point MI.

Nothing here imports Lightning (the l2m-checkpoint scorer reads its file with l2m.models).
"""

from l2m.mi.bipartite import BipartiteResult, SplitEstimate, bipartite_mi, default_splits
from l2m.mi.counts import PairCounter
from l2m.mi.entropy import grassberger_entropy, naive_entropy
from l2m.fit import PowerLawFit, fit_power_law
from l2m.mi.scorers import ExactScorer, ModelScorer, Scorer, check_tokenizer, load_checkpoint_scorer, load_hf_scorer
from l2m.mi.synthetic import MarkovChain, MarkovMixture, example_source
from l2m.mi.two_point import DecayFit, fit_decay_with_offset, two_point_mi

__all__ = [
    "BipartiteResult",
    "DecayFit",
    "ExactScorer",
    "MarkovChain",
    "MarkovMixture",
    "ModelScorer",
    "PairCounter",
    "PowerLawFit",
    "Scorer",
    "SplitEstimate",
    "bipartite_mi",
    "check_tokenizer",
    "default_splits",
    "example_source",
    "fit_decay_with_offset",
    "fit_power_law",
    "grassberger_entropy",
    "load_checkpoint_scorer",
    "load_hf_scorer",
    "naive_entropy",
    "two_point_mi",
]
