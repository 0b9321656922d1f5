"""Data: one package per task, each holding its exact law (math only) and its DataModule (Lightning):
l2m.data.gaussian, l2m.data.recall, l2m.data.text; the contract they fulfil for training
(l2m.data.contract).

Nothing is imported here, so that the math never pulls in Lightning.
"""

# Where data modules that earlier versions recorded in checkpoints (`_target_`) live now.
MOVED_DATA_MODULES = {
    "l2m.data.gaussian_datamodule.GaussianDataModule": "l2m.data.gaussian.datamodule.GaussianDataModule",
    "l2m.data.recall_datamodule.RecallDataModule": "l2m.data.recall.datamodule.RecallDataModule",
}


def with_current_target(data: dict) -> dict:
    """A data config read from a checkpoint, its `_target_` the data module's import path today."""
    target = data.get("_target_")
    return {**data, "_target_": MOVED_DATA_MODULES.get(target, target)} if target else dict(data)
