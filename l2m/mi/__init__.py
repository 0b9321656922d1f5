"""Mutual-information math: power-law fits, entropy estimators, bipartite and two-point MI."""

from l2m.mi.fit import PowerLawFit, fit_power_law

__all__ = ["PowerLawFit", "fit_power_law"]
