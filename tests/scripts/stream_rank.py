"""One rank of a multi-process stream test: prints the global indices it got, batch by batch (JSON).

    python tests/scripts/stream_rank.py DATA RANK WORLD WORKERS BATCH REMAINDER [STATE_IN] [STOP] [STATE_OUT]
"""

import json
import sys

from patchrec_dist.data.stream import StreamConfig, StreamLoader


def main() -> None:
    data, rank, world, workers, batch, remainder = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
    state_in = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] != "-" else None
    stop = int(sys.argv[8]) if len(sys.argv) > 8 else None
    cfg = StreamConfig(split="train", batch_size=batch, num_workers=workers, remainder=remainder, seed=3)
    loader = StreamLoader(data, cfg, rank=rank, world=world)
    if state_in:
        with open(state_in) as f:
            loader.load_state_dict(json.load(f))
    batches = []
    for b in loader:
        batches.append([[e.index, e.pad, e.user, e.position] for e in b])
        if stop is not None and len(batches) == stop:
            break
    if len(sys.argv) > 9:
        with open(sys.argv[9], "w") as f:
            json.dump(loader.state_dict(), f)
    print(json.dumps({"rank": rank, "batches": batches}))


if __name__ == "__main__":
    main()
