"""Data sources: the exact Gaussian family (math only, no Lightning) and Lightning DataModules."""

__all__ = ["GaussianFamily", "GaussianDataModule"]


def __getattr__(name: str):
    # Lazy: `python -m l2m.data.gaussian` must not find its module pre-imported, and the
    # Gaussian math must not pull in Lightning.
    if name == "GaussianFamily":
        from l2m.data.gaussian import GaussianFamily

        return GaussianFamily
    if name == "GaussianDataModule":
        from l2m.data.gaussian_datamodule import GaussianDataModule

        return GaussianDataModule
    raise AttributeError(f"module 'l2m.data' has no attribute {name!r}")
