"""The data set manifest: the one file that makes a folder of shards a data set.

Written last by the sharder; a folder without it does not exist for readers. It carries what the
stream needs to plan an epoch without reading any shard: per-shard sample and example counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from patchrec_dist.data import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
# reference.md: a target needs at least this many history items before it, and a user more than this many.
MIN_TARGET_POSITION = 3


class DataSetError(RuntimeError):
    """A data set that cannot be used: missing manifest, altered shard, unknown schema."""


@dataclass
class ShardInfo:
    path: str  # relative to the data set root
    samples: int
    interactions: int
    bytes: int
    sha256: str
    examples: dict[str, int]


@dataclass
class Manifest:
    schema_version: int
    generation: str
    created: str
    source: dict[str, Any]
    split: dict[str, Any]
    has_timestamps: bool
    counts: dict[str, Any]
    catalog: dict[str, Any]
    shards: list[ShardInfo]
    prompt: dict[str, str] | None = None  # {"system", "instruction"} when the source carries its own
    root: str = field(default="", compare=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: str = "") -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataSetError(f"{root}: manifest schema_version {version!r}, this version reads {SCHEMA_VERSION}")
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d, root=root)

    def shard_url(self, index: int) -> str:
        return storage.join(self.root, self.shards[index].path)

    @property
    def catalog_url(self) -> str:
        return storage.join(self.root, self.catalog["path"])

    def num_examples(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return int(self.counts["examples"][split])


def load_manifest(root: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read ROOT/manifest.json; refuse a folder without one (an unfinished or foreign data set)."""
    url = storage.join(root, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise DataSetError(
            f"{root}: no {MANIFEST_NAME}; not a data set (or its sharding did not finish). "
            "Create one with tools/shard_histories.py"
        ) from None
    try:
        return Manifest.from_dict(json.loads(raw), root=root.rstrip("/"))
    except (ValueError, TypeError, KeyError) as exc:
        raise DataSetError(f"{url}: unreadable manifest: {exc}") from exc


def verify_blob(data: bytes, url: str, expected_bytes: int, expected_sha256: str) -> None:
    """Detect a truncated or altered file by the manifest's size and checksum."""
    if len(data) != expected_bytes:
        raise DataSetError(
            f"{url}: {len(data)} bytes, manifest says {expected_bytes} (truncated or replaced file)"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise DataSetError(f"{url}: sha256 {digest[:12]}... differs from the manifest's {expected_sha256[:12]}...")


def examples_in_range(length: int, start: int | None, end: int | None) -> int:
    """Examples a split range [start, end] (inclusive target positions) yields for a history of LENGTH."""
    if start is None or end is None or length <= MIN_TARGET_POSITION:
        return 0
    lo = max(start, MIN_TARGET_POSITION)
    hi = min(end, length - 1)
    return max(0, hi - lo + 1)
