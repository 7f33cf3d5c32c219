"""Readers that turn interaction logs in several formats into one normalised pair of tables.

Every reader returns `RawLog`: interactions (user, item_key, time, rating, row) and items
(item_key, title, extra columns), as polars frames. Parsing is columnar; Python only touches
text when it must decode it strictly to name the offending line.

Errors name the file, the row (1-based data row) and the column.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from patchrec_dist.data import storage


class InputError(ValueError):
    """Bad input data; the message names the file, row and column (or the flag)."""


@dataclass
class RawLog:
    interactions: pl.DataFrame  # user, item_key (Int64 or str), time: Int64 (nullable), rating: Float64 (optional), row: UInt32
    items: pl.DataFrame  # item_key (Int64 or str), title: str, extras...
    splits: pl.DataFrame | None = None  # user, {train,val,test}_{start,end}: kept ranges (patchrec, table --split-col)
    has_timestamps: bool = True
    sources: dict[str, str] | None = None  # role -> file path, for messages
    prompt: dict[str, str] | None = None  # the data set's own prompt (patchrec's prompt.txt)


# ---------------------------------------------------------------------------------------------
# small helpers


def _read_raw(path: str, storage_options: dict[str, Any] | None = None) -> bytes:
    try:
        return storage.read_bytes(path, storage_options)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None


def decode_strict(data: bytes, path: str, encoding: str) -> str:
    """Decode DATA, naming the line of the first byte that is not valid ENCODING."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{path}: line {line}: bytes {data[exc.start:exc.end]!r} are not valid {encoding} text "
            f"(set --encoding if the file uses another one)"
        ) from None
    except LookupError:
        raise InputError(f"--encoding {encoding!r}: unknown encoding") from None


def _require_columns(df: pl.DataFrame, columns: list[str], path: str, flag_hint: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        hint = f" ({flag_hint})" if flag_hint else ""
        raise InputError(f"{path}: missing column(s) {missing}{hint}; columns present: {df.columns}")


def _first_bad_row(mask: pl.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0]) + 1


def normalise_ids(series: pl.Series, path: str, column: str) -> pl.Series:
    """IDs as Int64 when every id is a plain integer (cheap to sort and join at 10^8 rows), else
    as stripped strings. A missing or empty id is an error naming its row."""
    if series.dtype.is_integer():
        out = series.cast(pl.Int64)
    elif series.dtype.is_float():
        bad = series.is_null() | series.is_nan() | (series != series.floor())
        if bad.any():
            row = _first_bad_row(bad.fill_null(True))
            raise InputError(f"{path}: row {row}, column '{column}': id {series[row - 1]!r} is not an integer id")
        out = series.cast(pl.Int64)
    else:
        out = series.cast(pl.Utf8).str.strip_chars()
        bad = out.is_null() | (out.str.len_bytes() == 0)
        if bad.any():
            raise InputError(f"{path}: row {_first_bad_row(bad)}, column '{column}': missing or empty id")
        as_int = out.cast(pl.Int64, strict=False)
        # only when the text round-trips: "007" and "7" must stay different ids
        if as_int.null_count() == 0 and (as_int.cast(pl.Utf8) == out).all():
            out = as_int
    missing = out.is_null()
    if missing.any():
        raise InputError(f"{path}: row {_first_bad_row(missing)}, column '{column}': missing or empty id")
    return out


def align_id_types(a: pl.Series, b: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Make two id columns comparable: integers on both sides, or strings on both sides."""
    if a.dtype == b.dtype:
        return a, b
    return a.cast(pl.Utf8), b.cast(pl.Utf8)


def normalise_times(series: pl.Series, path: str, column: str) -> pl.Series:
    """Timestamps as Int64 seconds: integers, integral floats, numeric strings or ISO date-times."""
    s = series
    if s.dtype in (pl.Datetime, pl.Date) or isinstance(s.dtype, pl.Datetime):
        out = s.cast(pl.Datetime("us")).dt.epoch("s")
    elif s.dtype.is_integer():
        out = s.cast(pl.Int64)
    elif s.dtype.is_float():
        bad = s.is_nan() | s.is_infinite()
        if bad.fill_null(False).any():
            row = _first_bad_row(bad.fill_null(False))
            raise InputError(f"{path}: row {row}, column '{column}': timestamp {s[row - 1]!r} is not a number")
        out = s.floor().cast(pl.Int64)
    else:
        text = s.cast(pl.Utf8).str.strip_chars()
        as_int = text.cast(pl.Int64, strict=False)
        as_float = text.cast(pl.Float64, strict=False).floor().cast(pl.Int64, strict=False)
        out = as_int.fill_null(as_float)
        if out.null_count() > text.null_count():  # some are not numbers: try ISO date-times
            try:
                out = out.fill_null(text.str.to_datetime(strict=False).dt.epoch("s"))
            except pl.exceptions.PolarsError:
                pass  # no common date-time format: the rows stay unparsed and are reported below
        bad = out.is_null() & text.is_not_null()
        if bad.any():
            row = _first_bad_row(bad)
            raise InputError(f"{path}: row {row}, column '{column}': cannot parse timestamp {text[row - 1]!r}")
    missing = out.is_null()
    if missing.any():
        row = _first_bad_row(missing)
        raise InputError(f"{path}: row {row}, column '{column}': missing timestamp")
    return out.alias("time")


def normalise_ratings(series: pl.Series, path: str, column: str) -> pl.Series:
    out = series.cast(pl.Float64, strict=False)
    bad = out.is_null() & series.is_not_null()
    if bad.any():
        row = _first_bad_row(bad)
        raise InputError(f"{path}: row {row}, column '{column}': rating {series[row - 1]!r} is not a number")
    return out.alias("rating")


def check_titles(titles: pl.Series, path: str, column: str) -> pl.Series:
    out = titles.cast(pl.Utf8)
    bad = out.is_null() | (out.str.strip_chars().str.len_bytes() == 0)
    if bad.any():
        row = _first_bad_row(bad)
        raise InputError(f"{path}: row {row}, column '{column}': missing or empty title")
    # A control character in a title breaks prompts and tokenisation round-trips: refuse it.
    ctrl = out.str.contains(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
    if ctrl.any():
        row = _first_bad_row(ctrl)
        raise InputError(f"{path}: row {row}, column '{column}': title {out[row - 1]!r} holds control characters")
    return out.str.strip_chars()


def _interactions(path: str, users, items, times, ratings=None, user_col="user", item_col="item",
                  time_col="time", rating_col="rating") -> pl.DataFrame:
    cols = [
        normalise_ids(users, path, user_col).alias("user"),
        normalise_ids(items, path, item_col).alias("item_key"),
        normalise_times(times, path, time_col),
    ]
    if ratings is not None:
        cols.append(normalise_ratings(ratings, path, rating_col))
    df = pl.DataFrame(cols)
    return df.with_row_index("row")


def _items(path: str, keys, titles, extras: pl.DataFrame | None = None, item_col="item",
           title_col="title") -> pl.DataFrame:
    df = pl.DataFrame([normalise_ids(keys, path, item_col).alias("item_key"),
                       check_titles(titles, path, title_col).alias("title")])
    if extras is not None and extras.width:
        df = pl.concat([df, extras], how="horizontal")
    dup = ~df["item_key"].is_first_distinct()  # report the repeat, not the original
    if dup.any():
        row = _first_bad_row(dup)
        raise InputError(f"{path}: row {row}, column '{item_col}': item id {df['item_key'][row - 1]!r} appears more than once")
    return df


def _read_delimited_text(text: str, path: str, sep: str, header: bool, names: list[str] | None = None) -> pl.DataFrame:
    if len(sep) > 1:  # polars wants a one-byte separator (MovieLens-1M uses "::")
        text = text.replace(sep, "\x1f")
        sep = "\x1f"
    try:
        return pl.read_csv(
            io.StringIO(text), separator=sep, has_header=header, new_columns=names,
            quote_char=None, infer_schema=False, truncate_ragged_lines=False,
        )
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{path}: cannot parse as {sep!r}-separated text: {exc}") from None


# ---------------------------------------------------------------------------------------------
# formats


def read_recbole(folder: str, title_field: str | None, encoding: str, storage_options=None) -> RawLog:
    """RecBole atomic files: NAME.inter (user_id, item_id, timestamp[, rating]) and NAME.item."""
    fs, root = storage.filesystem_for(folder, storage_options)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        raise InputError(f"{folder}: folder not found") from None
    inter = [n for n in names if n.endswith(".inter")]
    item = [n for n in names if n.endswith(".item")]
    if len(inter) != 1 or len(item) != 1:
        raise InputError(f"{folder}: expected one NAME.inter and one NAME.item file, found {len(inter)} and {len(item)}")
    inter_path, item_path = (storage.join(folder, os.path.basename(inter[0])),
                             storage.join(folder, os.path.basename(item[0])))

    def load(path: str) -> pl.DataFrame:
        df = _read_delimited_text(decode_strict(_read_raw(path, storage_options), path, encoding), path, "\t", True)
        return df.rename({c: c.split(":")[0] for c in df.columns})  # "user_id:token" -> "user_id"

    di = load(inter_path)
    _require_columns(di, ["user_id", "item_id", "timestamp"], inter_path)
    ratings = di["rating"] if "rating" in di.columns else None
    interactions = _interactions(inter_path, di["user_id"], di["item_id"], di["timestamp"], ratings,
                                 "user_id", "item_id", "timestamp", "rating")
    dt = load(item_path)
    _require_columns(dt, ["item_id"], item_path)
    if title_field is None:
        candidates = [c for c in dt.columns if "title" in c.lower()]
        if not candidates:
            raise InputError(f"{item_path}: no '*title*' column; name the title column with --title-field")
        title_field = candidates[0]
    _require_columns(dt, [title_field], item_path, "--title-field")
    extras = dt.drop(["item_id", title_field])
    items = _items(item_path, dt["item_id"], dt[title_field], extras, "item_id", title_field)
    return RawLog(interactions, items, sources={"interactions": inter_path, "items": item_path})


def read_movielens(folder: str, encoding: str = "latin-1", storage_options=None) -> RawLog:
    """Raw MovieLens: ML-100K (u.data, u.item) or ML-1M (ratings.dat, movies.dat), latin-1."""
    fs, root = storage.filesystem_for(folder, storage_options)
    if not fs.exists(root):
        raise InputError(f"{folder}: folder not found")
    present = {os.path.basename(p) for p in fs.ls(root, detail=False)}
    if {"u.data", "u.item"} <= present:
        ip, tp = storage.join(folder, "u.data"), storage.join(folder, "u.item")
        di = _read_delimited_text(decode_strict(_read_raw(ip, storage_options), ip, encoding), ip, "\t", False,
                                  ["user", "item", "rating", "time"])
        dt = _read_delimited_text(decode_strict(_read_raw(tp, storage_options), tp, encoding), tp, "|", False)
        dt = dt.select(dt.columns[:3]).rename(dict(zip(dt.columns[:3], ["item", "title", "release_date"])))
    elif {"ratings.dat", "movies.dat"} <= present:
        ip, tp = storage.join(folder, "ratings.dat"), storage.join(folder, "movies.dat")
        di = _read_delimited_text(decode_strict(_read_raw(ip, storage_options), ip, encoding), ip, "::", False,
                                  ["user", "item", "rating", "time"])
        dt = _read_delimited_text(decode_strict(_read_raw(tp, storage_options), tp, encoding), tp, "::", False,
                                  ["item", "title", "genres"])
    else:
        raise InputError(f"{folder}: neither ML-100K (u.data, u.item) nor ML-1M (ratings.dat, movies.dat) files found")
    interactions = _interactions(ip, di["user"], di["item"], di["time"], di["rating"],
                                 "user (1)", "item (2)", "timestamp (4)", "rating (3)")
    extras = dt.drop(["item", "title"])
    items = _items(tp, dt["item"], dt["title"], extras, "item (1)", "title (2)")
    return RawLog(interactions, items, sources={"interactions": ip, "items": tp})


def read_patchrec(folder: str, trust_pickle: bool, encoding: str = "utf-8", storage_options=None) -> RawLog:
    """The paper's processed folders: seq.df (pandas pickle) + id2title.txt (`id||title`)."""
    seq_path, title_path = storage.join(folder, "seq.df"), storage.join(folder, "id2title.txt")
    if not trust_pickle:
        raise InputError(
            f"{seq_path}: is a Python pickle, and unpickling runs whatever code the file holds. "
            "Pass --trust-pickle only for files from a source you trust (such as the paper's released data)."
        )
    raw = _read_raw(seq_path, storage_options)
    try:
        import pandas  # noqa: F401 - the pickle references pandas classes
    except ImportError:
        raise InputError(f"{seq_path}: reading this pandas pickle needs pandas (pip install pandas)") from None
    try:
        frame = pickle.loads(raw)  # noqa: S301 - guarded by --trust-pickle above
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{seq_path}: not a readable pickle: {type(exc).__name__}: {exc}") from None
    needed = ["seq", "train_idx", "val_idx", "test_idx"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputError(f"{seq_path}: missing column(s) {missing}; columns present: {list(frame.columns)}")

    users, items, ranges = [], [], {f"{s}_{b}": [] for s in ("train", "val", "test") for b in ("start", "end")}
    user_keys = []
    for row, (user, seq) in enumerate(zip(frame.index, frame["seq"]), start=1):
        seq = list(seq)
        if any(x is None for x in seq):
            raise InputError(f"{seq_path}: row {row}, column 'seq': missing item id")
        user_keys.append(str(user))
        users.append(np.full(len(seq), row - 1, dtype=np.int64))
        items.append(np.asarray(seq, dtype=np.int64))
        for split in ("train", "val", "test"):
            start, end = _patchrec_range(frame[f"{split}_idx"].iloc[row - 1], len(seq), seq_path, row, split)
            ranges[f"{split}_start"].append(start)
            ranges[f"{split}_end"].append(end)
    flat_users = np.concatenate(users) if users else np.zeros(0, np.int64)
    flat_items = np.concatenate(items) if items else np.zeros(0, np.int64)
    keys = np.asarray(user_keys, dtype=object)
    interactions = pl.DataFrame({
        "user": pl.Series(keys[flat_users].tolist() if len(flat_users) else [], dtype=pl.Utf8),
        "item_key": pl.Series(flat_items),
        "time": pl.Series([None] * len(flat_items), dtype=pl.Int64),
    }).with_row_index("row")
    splits = pl.DataFrame({"user": pl.Series(user_keys, dtype=pl.Utf8),
                           **{k: pl.Series(v, dtype=pl.Int64) for k, v in ranges.items()}})

    text = decode_strict(_read_raw(title_path, storage_options), title_path, encoding)
    keys_t, titles = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, title = line.partition("||")
        if not sep:
            raise InputError(f"{title_path}: line {line_no}: expected 'id||title', got {line[:60]!r}")
        keys_t.append(key)
        titles.append(title)
    items_df = _items(title_path, pl.Series(keys_t), pl.Series(titles), None, "id", "title")
    prompt = None
    prompt_path = storage.join(folder, "prompt.txt")
    if storage.exists(prompt_path, storage_options):
        lines = [ln.strip() for ln in decode_strict(_read_raw(prompt_path, storage_options), prompt_path,
                                                      encoding).splitlines() if ln.strip()]
        if len(lines) != 2 or "[HISTORY_SEQUENCE]" not in lines[1]:
            raise InputError(f"{prompt_path}: expected two lines, system and an instruction with [HISTORY_SEQUENCE]")
        prompt = {"system": lines[0], "instruction": lines[1]}
    return RawLog(interactions, items_df, splits=splits, has_timestamps=False,
                  sources={"interactions": seq_path, "items": title_path}, prompt=prompt)


def _patchrec_range(value, length: int, path: str, row: int, split: str) -> tuple[int | None, int | None]:
    """[start, end] inclusive target positions, or (None, None) for an empty split."""
    if value is None or len(value) != 2 or value[0] is None or value[1] is None:
        return None, None
    try:
        start, end = int(value[0]), int(value[1])
    except (TypeError, ValueError):
        raise InputError(f"{path}: row {row}, column '{split}_idx': {value!r} is not a [start, end] pair") from None
    if not (0 <= start <= end < length):
        raise InputError(f"{path}: row {row}, column '{split}_idx': range {value!r} outside the history of {length} items")
    return start, end


def _read_table_file(path: str, encoding: str, storage_options=None) -> pl.DataFrame:
    lower = path.lower()
    raw = _read_raw(path, storage_options)
    try:
        if lower.endswith((".parquet", ".pq")):
            return pl.read_parquet(io.BytesIO(raw))
        if lower.endswith((".jsonl", ".ndjson")):
            return pl.read_ndjson(io.StringIO(decode_strict(raw, path, encoding)))
        if lower.endswith((".csv", ".tsv", ".txt")):
            sep = "\t" if lower.endswith(".tsv") else ","
            text = decode_strict(raw, path, encoding)
            return pl.read_csv(io.StringIO(text), separator=sep, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{path}: cannot parse: {exc}") from None
    raise InputError(f"{path}: unknown table type; use .csv, .tsv, .parquet or .jsonl")


def read_table(path: str, items_path: str | None, user_col: str, item_col: str, time_col: str,
               rating_col: str | None, items_item_col: str | None, title_col: str, encoding: str,
               storage_options=None, split_col: str | None = None) -> RawLog:
    """CSV / TSV / Parquet / JSONL interactions plus an items table. SPLIT_COL names a column that
    marks each target row train, val or test (empty: history only): the log's own split."""
    if not items_path:
        raise InputError("--items: the table format needs an items table with ids and titles")
    di = _read_table_file(path, encoding, storage_options)
    needed = [user_col, item_col, time_col] + ([rating_col] if rating_col else []) + ([split_col] if split_col else [])
    _require_columns(di, needed, path, "--user-col/--item-col/--time-col/--rating-col/--split-col")
    interactions = _interactions(path, di[user_col], di[item_col], di[time_col],
                                 di[rating_col] if rating_col else None, user_col, item_col, time_col,
                                 rating_col or "")
    splits = _split_column_ranges(interactions, di[split_col], path, split_col) if split_col else None
    dt = _read_table_file(items_path, encoding, storage_options)
    key_col = items_item_col or item_col
    _require_columns(dt, [key_col, title_col], items_path, "--items-item-col/--title-col")
    items = _items(items_path, dt[key_col], dt[title_col], dt.drop([key_col, title_col]), key_col, title_col)
    return RawLog(interactions, items, splits=splits, sources={"interactions": path, "items": items_path})


_SPLIT_NAMES = ("train", "val", "test")


def _split_column_ranges(interactions: pl.DataFrame, labels: pl.Series, path: str, column: str) -> pl.DataFrame:
    """Per user, the [start, end] target positions of each split that LABELS mark, as positions in
    the order the histories are built (user, then time; ties keep input order). A split's rows of
    one user must be consecutive in that order, as the shards store one range per split."""
    text = labels.cast(pl.Utf8).str.strip_chars()
    text = text.set(text == "", None)
    bad = text.is_not_null() & ~text.is_in(list(_SPLIT_NAMES))
    if bad.any():
        row = _first_bad_row(bad)
        raise InputError(f"{path}: row {row}, column '{column}': split {labels[row - 1]!r} is not one of "
                         f"train, val, test (or empty for a history-only row)")
    ordered = (interactions.select("user", "time", "row").with_columns(split=text)
               .sort(["user", "time"], maintain_order=True)
               .with_columns(pos=pl.int_range(pl.len()).over("user")))
    marked = ordered.filter(pl.col("split").is_not_null())
    ranges = marked.group_by(["user", "split"]).agg(start=pl.col("pos").min(), end=pl.col("pos").max(),
                                                    n=pl.len(), row=pl.col("row").min())
    gaps = ranges.filter(pl.col("end") - pl.col("start") + 1 != pl.col("n")).sort("row")
    if gaps.height:
        g = gaps.row(0, named=True)
        raise InputError(f"{path}: user {g['user']!r}: its {g['split']!r} rows (column '{column}') are not consecutive "
                         "in time order; each split of a user must be one run of targets")
    users = ordered.select(pl.col("user").unique(maintain_order=True))
    out = users
    for split in _SPLIT_NAMES:
        part = ranges.filter(pl.col("split") == split).select(
            "user", pl.col("start").alias(f"{split}_start"), pl.col("end").alias(f"{split}_end"))
        out = out.join(part, on="user", how="left", maintain_order="left")
    return out.with_columns(pl.col("user").cast(pl.Utf8), *[pl.col(f"{s}_{b}").cast(pl.Int64)
                                                            for s in _SPLIT_NAMES for b in ("start", "end")])


FORMATS = ("recbole", "movielens", "patchrec", "table")


def read_log(fmt: str, input_path: str, *, encoding: str | None = None, title_field: str | None = None,
             trust_pickle: bool = False, items: str | None = None, user_col: str = "user_id",
             item_col: str = "item_id", time_col: str = "timestamp", rating_col: str | None = None,
             items_item_col: str | None = None, title_col: str = "title", split_col: str | None = None,
             storage_options: dict[str, Any] | None = None) -> RawLog:
    """Read INPUT_PATH in format FMT (one of FORMATS)."""
    if fmt == "recbole":
        return read_recbole(input_path, title_field, encoding or "utf-8", storage_options)
    if fmt == "movielens":
        return read_movielens(input_path, encoding or "latin-1", storage_options)
    if fmt == "patchrec":
        return read_patchrec(input_path, trust_pickle, encoding or "utf-8", storage_options)
    if fmt == "table":
        return read_table(input_path, items, user_col, item_col, time_col, rating_col, items_item_col,
                          title_col, encoding or "utf-8", storage_options, split_col)
    if split_col:
        raise InputError(f"--split-col: only the table format reads a split column (this is --format {fmt})")
    raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
