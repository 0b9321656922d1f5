"""The OmegaConf resolvers the configs in conf/ use, registered when l2m.jobs is imported (before
Hydra resolves a config): `${l2m.<name>:...}`."""

from omegaconf import OmegaConf

from l2m.checks import UserError, check_ints
from l2m.data.gaussian import levels_of_length
from l2m.jobs.cluster import cpus_per_task, devices_per_node, gpus_per_node, run_name, sweep_id, wandb_names


def gaussian_levels(seq_len: int | None) -> int | None:
    """data.levels from data.seq_len (conf/data/gaussian.yaml): 3 (L = 64) where no length is given;
    None for a length that is not one of the family's, which GaussianDataModule then names."""
    if seq_len is None:
        return 3
    try:
        return levels_of_length(seq_len)
    except ValueError:
        return None


def batch_within_tokens(batch_size: int, max_tokens: int, seq_len: int) -> int:
    """data.batch_size: batch_size sequences, fewer where they would pass max_tokens tokens per step (at
    least one), so that a sweep over L spends at most the same tokens on a step at every L."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise UserError("the batch size is capped by tokens per step, which needs the sequence length: "
                        f"give data.seq_len=<tokens>, not {seq_len!r}")
    check_ints(**{"batch_within_tokens's batch size": (batch_size, 1),
                  "batch_within_tokens's tokens a step": (max_tokens, 1)})
    return max(1, min(batch_size, max_tokens // seq_len))


# name: (function, cached). Cached: a run's directory is computed once, and every job of a sweep reads it.
RESOLVERS = {
    "run_dir_name": (run_name, True),
    "sweep_id": (sweep_id, False),
    "run_group": (lambda: wandb_names()[0] or "", False),
    "run_name": (lambda: wandb_names()[1] or "", False),
    "devices_per_node": (devices_per_node, False),
    "gpus_per_node": (gpus_per_node, False),
    "cpus_per_task": (cpus_per_task, False),
    "gaussian_levels": (gaussian_levels, False),
    "batch_within_tokens": (batch_within_tokens, False),
}
for name, (function, cached) in RESOLVERS.items():
    OmegaConf.register_new_resolver(f"l2m.{name}", function, use_cache=cached, replace=True)
