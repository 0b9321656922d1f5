"""Position-wise metrics of a checkpoint: `python evaluate.py ckpt_path=... [data.val_size=N]`.

Writes positionwise.csv, summary.json and positionwise.png to a new run directory.
Configs: conf/evaluate.yaml.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from l2m.jobs import evaluate, report_errors
from l2m.jobs.composition import check_command_line
from l2m.jobs.job_log import output_in_job_log


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with output_in_job_log(), report_errors():
        evaluate(cfg)


if __name__ == "__main__":
    check_command_line(Path(__file__).with_name("conf"), "evaluate")
    main()
