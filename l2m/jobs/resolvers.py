"""The OmegaConf resolvers the configs in conf/ use, registered when l2m.jobs is imported (before
Hydra resolves a config): `${l2m.<name>:...}`."""

from omegaconf import OmegaConf

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
}
for name, (function, cached) in RESOLVERS.items():
    OmegaConf.register_new_resolver(f"l2m.{name}", function, use_cache=cached, replace=True)
