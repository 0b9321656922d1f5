"""Train an l2m model: `python train.py [model=... data.levels=... trainer=... experiment=...]`.

With no arguments: a tiny GPT on the Gaussian task (L = 64, 64 copies) on the CPU in a few
minutes, ending with the L²M summary table. Configs: conf/train.yaml.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from l2m.jobs import report_errors, train
from l2m.jobs.composition import check_command_line
from l2m.jobs.job_log import output_in_job_log


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with output_in_job_log(), report_errors():
        train(cfg)


if __name__ == "__main__":
    check_command_line(Path(__file__).with_name("conf"), "train")
    main()
