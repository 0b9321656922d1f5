"""`python -m l2m.export CKPT OUT_DIR`: write the model of an l2m checkpoint as a transformers folder
(GPT2LMHeadModel, MambaForCausalLM or Mamba2ForCausalLM) that AutoModelForCausalLM loads, with the
BOS and EOS ids of the tokenizer it was trained with."""

from __future__ import annotations

import argparse
import sys

from l2m.checks import BAD_INPUT, one_line_errors
from l2m.data.text.tokenizer import get_tokenizer
from l2m.models import load_checkpoint
from l2m.models.hf import to_hf


def special_token_ids(data: dict) -> dict:
    """{bos_token_id, eos_token_id} of the tokenizer named in a checkpoint's data config; None where the
    data had no tokenizer or it cannot be loaded here (a hub id offline: a note says so)."""
    tokenizer = None
    try:
        tokenizer = get_tokenizer(data["tokenizer"]) if "tokenizer" in data else None
    except BAD_INPUT as error:
        print(f"note: no BOS/EOS ids in config.json, the tokenizer did not load: {error}", file=sys.stderr)
    return {"bos_token_id": tokenizer and tokenizer.bos_id, "eos_token_id": tokenizer and tokenizer.eos_id}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2m.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="an l2m checkpoint, e.g. <run dir>/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="the folder to write (config.json, model.safetensors)")
    args = parser.parse_args(argv)
    with one_line_errors(path_hint="check the checkpoint's path, or choose an OUT_DIR you can write to"):
        checkpoint = load_checkpoint(args.ckpt)
        out = to_hf(checkpoint.model, args.out_dir, **special_token_ids(checkpoint.hparams["data"]))
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
