"""Data sources: the exact Gaussian family (math only, no Lightning) and Lightning DataModules."""

from l2m.data.gaussian import GaussianFamily

__all__ = ["GaussianFamily", "GaussianDataModule"]


def __getattr__(name: str):
    # Lazy, so `import l2m.data` / `l2m.data.gaussian` never pulls in Lightning.
    if name == "GaussianDataModule":
        from l2m.data.gaussian_datamodule import GaussianDataModule

        return GaussianDataModule
    raise AttributeError(f"module 'l2m.data' has no attribute {name!r}")
