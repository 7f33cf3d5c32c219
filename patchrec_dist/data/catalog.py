"""The catalog: item index -> title (and any extra item columns), as the sharder wrote it."""

from __future__ import annotations

import io
from typing import Any

import polars as pl

from patchrec_dist.data import storage
from patchrec_dist.data.manifest import Manifest, verify_blob


def load_catalog(manifest: Manifest, storage_options: dict[str, Any] | None = None) -> pl.DataFrame:
    """Columns item (dense index = row), item_id (the source's id, text), title, extras."""
    url = manifest.catalog_url
    data = storage.read_bytes(url, storage_options)
    verify_blob(data, url, manifest.catalog["bytes"], manifest.catalog["sha256"])
    return pl.read_parquet(io.BytesIO(data))


def catalog_titles(manifest: Manifest, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Titles in item-index order."""
    return load_catalog(manifest, storage_options)["title"].to_list()
