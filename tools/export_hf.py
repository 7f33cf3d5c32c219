#!/usr/bin/env python
"""Export a run's checkpoint as a standard Hugging Face model folder.

    python tools/export_hf.py RUN_DIR_OR_URL OUT_DIR [--tag step_00000120] [--merge-lora]

The folder (safetensors, config, tokenizer with the PatchRec tokens, generation config) loads
with AutoModelForCausalLM.from_pretrained, and `--init` and evaluation accept it. A LoRA run
is merged into the base weights with --merge-lora; without it OUT_DIR holds the adapter and
OUT_DIR/base the base model (transformers' peft integration loads the pair).
"""

import argparse
import sys

from patchrec_dist.train.export import export_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder or URL (with checkpoints/)")
    p.add_argument("out", help="output folder or URL")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the weights")
    args = p.parse_args(argv)
    try:
        out = export_run(args.run, args.out, tag=args.tag, merge_lora=args.merge_lora)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"export_hf: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
