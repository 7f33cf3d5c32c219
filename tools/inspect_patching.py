#!/usr/bin/env python
"""Show which history items a stage feeds as text, item patches or session patches.

    python tools/inspect_patching.py --history-len 23 --stage pft-s --group-size 5
    python tools/inspect_patching.py --history-len 23 --stage pft-s --json
    python tools/inspect_patching.py --history-len 10000 --stage budget --max-positions 500 --title-tokens 10
    python tools/inspect_patching.py --history-len 30 --stage ppt --p 0.5 --seed 0
    python tools/inspect_patching.py --data data/ml100k --user 42 --split test --stage pft-s --group-size 5 \
        --tokenizer ../shared/tokenizers/llama-3.2

Without a data set the history is synthetic: N items whose titles all cost --title-tokens tokens
(default 1). --json prints {"segments": [{"kind": ..., "items": [...]}, ...], "positions": P}.
The layout rules live in patchrec_dist.patching.layouts; this script only parses flags and prints.

Exit status: 0 on success, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

try:
    from patchrec_dist.patching.layouts import (
        LayoutSpec,
        Segment,
        make_layout,
        positions_fed,
        ppt_rng,
    )
    from patchrec_dist.train.config import add_flag, flag_fields
except ImportError as exc:  # pragma: no cover - only without an installed package
    sys.exit(f"inspect_patching: cannot import patchrec_dist ({exc}); install it first: pip install -e .")


@dataclass
class History:
    """What a layout needs to know about one history; a data-set reader would fill `times` too."""

    n: int
    title_lens: list[int]
    times: list[float] | None = None
    label: str = "synthetic history"
    titles: list[str] | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    h = p.add_argument_group("synthetic history")
    h.add_argument("--history-len", type=int, default=None, metavar="N", help="number of history items")
    h.add_argument("--title-tokens", type=int, default=1, metavar="T",
                   help="tokens per title: what a text item costs besides its separator (default 1)")
    # Hook for a later data-set mode: read one user's real history (titles tokenized, timestamps
    # for --session-gap) into a History in history_from_data(); nothing else here needs to change.
    d = p.add_argument_group("data set")
    d.add_argument("--data", default=None, metavar="URL", help="data set folder or URL (a manifest.json there)")
    d.add_argument("--user", default=None, metavar="ID", help="user whose history to show (with --data)")
    d.add_argument("--split", default="test", choices=("train", "val", "test"), help="with --data (default test)")
    d.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="HF tokenizer folder for title lengths (default: words per title)")
    d.add_argument("--max-history", type=int, default=100, help="with --data: most recent items kept (default 100)")
    s = p.add_argument_group("layout (the training and evaluation flags of the same names)")
    for f, hint, dest, default in flag_fields(LayoutSpec):
        add_flag(s, f, hint, dest, default)
    s.add_argument("--p", type=float, default=None, help="ppt: probability that an item is an item patch")
    s.add_argument("--seed", type=int, default=0, help="ppt: seed (epoch 0, example key 0)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help='print {"segments": [...], "positions": P}')
    return p


# Flags that only make sense for some stages: giving them elsewhere is an error, not silently ignored.
_STAGE_FLAGS = {
    "max_text_items": ("--max-text-items", ("text",)),
    "item_len": ("--item-len", ("pft-i",)),
    "group_size": ("--group-size", ("pft-s", "budget")),
    "max_positions": ("--max-positions", ("budget",)),
    "p": ("--p", ("ppt",)),
}


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values, naming the flag (parser.error exits with status 2)."""

    def at_least(value: int | None, flag: str, minimum: int) -> None:
        if value is not None and value < minimum:
            parser.error(f"{flag} must be >= {minimum}; got {value}")

    if args.data is not None:
        if args.user is None:
            parser.error("--data needs --user ID")
        if args.history_len is not None:
            parser.error("--history-len is for a synthetic history; with --data the history is the user's")
    elif args.user is not None:
        parser.error("--user needs --data")
    elif args.history_len is None:
        parser.error("--history-len is required (without --data)")
    if args.stage is None:
        parser.error("--stage is required")
    at_least(args.history_len, "--history-len", 0)
    at_least(args.title_tokens, "--title-tokens", 1)
    at_least(args.seed, "--seed", 0)
    for attr, (flag, stages) in _STAGE_FLAGS.items():
        if getattr(args, attr) is not None and args.stage not in stages:
            parser.error(f"{flag} applies to --stage {' / '.join(stages)}, not {args.stage}")
    try:
        spec_from_args(args)
    except ValueError as exc:
        parser.error(f"layout: {exc}")
    if args.stage == "ppt":
        if args.p is None:
            parser.error("--stage ppt needs --p")
        if not 0.0 <= args.p <= 1.0:
            parser.error(f"--p must be in [0, 1]; got {args.p}")


def spec_from_args(args: argparse.Namespace) -> LayoutSpec:
    """The layout flags given (the others keep LayoutSpec's defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(LayoutSpec) if getattr(args, f.name) is not None}
    return LayoutSpec(**given)


def history_from_flags(args: argparse.Namespace) -> History:
    return History(n=args.history_len, title_lens=[args.title_tokens] * args.history_len)


def _fail(message: str) -> None:
    print(f"inspect_patching: error: {message}", file=sys.stderr)
    sys.exit(2)


def history_from_data(args: argparse.Namespace) -> History:
    """The history before the user's first target of --split, with titles and their token counts."""
    from patchrec_dist.data.catalog import catalog_titles
    from patchrec_dist.data.manifest import DataSetError, load_manifest
    from patchrec_dist.data.stream import read_shard

    try:
        manifest = load_manifest(args.data)
        titles = catalog_titles(manifest)
        record = next((r for i in range(len(manifest.shards)) for r in read_shard(manifest, i)
                       if r.user == str(args.user)), None)
    except DataSetError as exc:
        _fail(str(exc))
    if record is None:
        _fail(f"--user {args.user}: no such user in {args.data}")
    rng = record.splits.get(args.split)
    if rng is None or len(record.items) <= 3 or rng[1] < 3:
        _fail(f"--user {args.user} has no {args.split} target")
    t = max(rng[0], 3)
    lo = max(0, t - args.max_history) if args.max_history else 0
    items = record.items[lo:t].tolist()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        lens = [len(x) for x in tok([titles[i] for i in items], add_special_tokens=False)["input_ids"]]
    else:
        lens = [max(1, len(titles[i].split())) for i in items]
    times = record.times[lo:t].tolist() if record.times is not None else None
    label = (f"user {record.user}, {args.split} target at position {t}: {titles[int(record.items[t])]!r}; "
             f"{len(items)} history items (of {t}), title lengths in "
             + ("tokens of " + args.tokenizer if args.tokenizer else "words (give --tokenizer for tokens)"))
    return History(n=len(items), title_lens=lens, times=times, label=label, titles=[titles[i] for i in items])


def layout_for(spec: LayoutSpec, history: History, args: argparse.Namespace) -> list[Segment]:
    rng = ppt_rng(args.seed, 0, 0) if spec.stage == "ppt" else None
    return make_layout(spec, history.n, title_lens=history.title_lens, times=history.times, p=args.p or 0.0, rng=rng)


def as_json(segments: Sequence[Segment], positions: int) -> str:
    return json.dumps({"segments": [{"kind": s.kind, "items": list(s.items)} for s in segments], "positions": positions})


def as_picture(segments: Sequence[Segment], positions: int, all_text: int, titles: list[str] | None = None) -> str:
    lines = []
    for seg in segments:
        if seg.kind == "session":
            span = f"{seg.items[0]}-{seg.items[-1]}" if len(seg.items) > 1 else f"{seg.items[0]}"
            line = f"session [{span}]"
            if titles:
                names = [titles[i] for i in seg.items]
                line += f"  {len(names)} items: " + "; ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        else:
            line = f"{seg.kind} {seg.items[0]}"
            if titles:
                line = f"{line:<12}{titles[seg.items[0]]}"
        lines.append(line)
    share = f"{100.0 * positions / all_text:.1f}%" if all_text else "-"
    lines.append(f"positions fed: {positions} (all-text prompt: {all_text}, {share})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    history = history_from_data(args) if args.data is not None else history_from_flags(args)
    try:
        spec = spec_from_args(args)
        segments = layout_for(spec, history, args)
    except ValueError as exc:  # the library names the parameter; flags were checked above
        parser.error(str(exc))
    positions = positions_fed(segments, history.title_lens)
    if args.json:
        print(as_json(segments, positions))
    else:
        all_text = sum(history.title_lens) + history.n
        if args.data is not None:
            print(history.label)
        print(as_picture(segments, positions, all_text, history.titles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
