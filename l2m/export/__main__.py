"""`python -m l2m.export CKPT OUT_DIR`: write the model of an l2m checkpoint as a transformers folder
(GPT2LMHeadModel, MambaForCausalLM or Mamba2ForCausalLM) that AutoModelForCausalLM loads, with the
tokenizer it was trained with (AutoTokenizer opens it) and its BOS and EOS ids. Only discrete-token
models export; Gaussian-token models have no transformers counterpart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2m.checks import BAD_INPUT, one_line_errors
from l2m.data.text.tokenizer import Tokenizer, get_tokenizer
from l2m.models import load_checkpoint
from l2m.models.hf import plain_file_modes, to_hf


def trained_tokenizer(data: dict) -> Tokenizer | None:
    """The tokenizer named in a checkpoint's data config; None where the data had none (token ids, not
    text) or it cannot be loaded here (a hub id offline: a note says so)."""
    try:
        return get_tokenizer(data["tokenizer"]) if "tokenizer" in data else None
    except BAD_INPUT as error:
        print(f"note: no tokenizer and no BOS/EOS ids in the folder, the tokenizer did not load: {error}", file=sys.stderr)
        return None


def write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """The tokenizer as transformers.AutoTokenizer opens it, with the same ids and BOS/EOS tokens."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=backend.id_to_token(tokenizer.bos_id),
                            eos_token=backend.id_to_token(tokenizer.eos_id)).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2m.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="an l2m checkpoint, e.g. <run dir>/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="the folder to write (config.json, model.safetensors)")
    args = parser.parse_args(argv)
    with one_line_errors(path_hint="check the checkpoint's path, or choose an OUT_DIR you can write to"):
        checkpoint = load_checkpoint(args.ckpt)
        tokenizer = trained_tokenizer(checkpoint.hparams["data"])
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id} if tokenizer else {}
        out = to_hf(checkpoint.model, args.out_dir, **ids)
        if tokenizer is not None:
            write_tokenizer(tokenizer, out)
            plain_file_modes(out)
    loads = f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
    print(f"wrote {out}: load it with {loads}" + (", its tokenizer with AutoTokenizer" if tokenizer else
                                                  " (no tokenizer: the model was trained on token ids, not text)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
