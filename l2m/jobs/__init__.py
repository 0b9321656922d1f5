"""The jobs behind the Hydra entry points train.py and evaluate.py, and the Hydra plumbing they need
(run directories, config groups instantiated by _target_, DDP inside multiruns)."""

from l2m.jobs.run import evaluate, report_errors, train

__all__ = ["evaluate", "report_errors", "train"]
