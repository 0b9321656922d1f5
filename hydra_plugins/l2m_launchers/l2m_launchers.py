"""Hydra finds launchers only in the hydra_plugins namespace: these names make l2m.jobs.launchers
available to conf/hydra/launcher/{slurm,local}.yaml. Without hydra-submitit-launcher they exist too
(so Hydra starts without a warning) and say what to install when chosen."""

from hydra.plugins.launcher import Launcher

try:
    from l2m.jobs import launchers
except ImportError as error:
    _MISSING = str(error)

    def _unavailable(*args, **kwargs):
        raise ImportError(_MISSING)

    def _stand_in(name: str) -> type:
        return type(name, (Launcher,), {"__module__": __name__, "__init__": _unavailable,
                                        "setup": _unavailable, "launch": _unavailable})

    SlurmLauncher, LocalLauncher = _stand_in("SlurmLauncher"), _stand_in("LocalLauncher")
else:

    class SlurmLauncher(launchers.SlurmLauncher):
        """hydra/launcher=slurm"""

    class LocalLauncher(launchers.LocalLauncher):
        """hydra/launcher=local"""
