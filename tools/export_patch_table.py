#!/usr/bin/env python
"""Export a run's item-patch table for serving: every catalog item's patch vector.

    python tools/export_patch_table.py RUN_OR_URL OUT_DIR_OR_URL [--data DATA]

OUT gets patch_table.safetensors (item_patches: items x hidden in the model's dtype, and the
PatchRec tokens' embeddings), items.parquet (row, item_id, title) and patch_table.json. A server
that accepts prompt embeddings builds PatchRec prompts from these rows and its own token
embeddings (patchrec_dist/model/patch_table.py says how). Exit status: 0, or 2 on bad input.
"""

import argparse
import sys

from patchrec_dist.train.export import export_patch_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a training run (its final/ export), or an HF folder with --data")
    p.add_argument("out", help="output folder or URL")
    p.add_argument("--data", default=None, help="data set whose catalog to export (default: the run's)")
    args = p.parse_args(argv)
    try:
        print(export_patch_table(args.run, args.out, data=args.data))
        return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"export_patch_table: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
