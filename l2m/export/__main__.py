"""`python -m l2m.export CKPT OUT_DIR`: write the model of an l2m checkpoint as a transformers folder
(GPT2LMHeadModel, MambaForCausalLM or Mamba2ForCausalLM) that AutoModelForCausalLM loads."""

from __future__ import annotations

import argparse
import sys

from l2m.checks import one_line_errors
from l2m.models import load_checkpoint
from l2m.models.hf import to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2m.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="an l2m checkpoint, e.g. <run dir>/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="the folder to write (config.json, model.safetensors)")
    args = parser.parse_args(argv)
    with one_line_errors(path_hint="check the checkpoint's path, or choose an OUT_DIR you can write to"):
        out = to_hf(load_checkpoint(args.ckpt).model, args.out_dir)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
