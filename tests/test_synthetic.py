"""Tests of the synthetic log generator and its writers (patchrec_dist.data.synthetic)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from patchrec_dist.data.synthetic import (
    FORMATS,
    GENRES,
    SyntheticSpec,
    check_titles_safe,
    generate_log,
    history_lengths,
    write_items_title_file,
    write_log,
)

SMALL = SyntheticSpec(users=60, items=400, mean_history=20.0, max_history=300, seed=7)
MID = SyntheticSpec(users=20_000, items=5_000, mean_history=50.0, max_history=2_000, seed=3)


@pytest.fixture(scope="module")
def small():
    return generate_log(SMALL)


@pytest.fixture(scope="module")
def mid():
    return generate_log(MID)


# ---------------------------------------------------------------------------------------------
# generation


def test_schema_and_ranges(small):
    inter, items = small
    assert inter.schema == pl.Schema({"user": pl.Int64, "item": pl.Int64, "rating": pl.Int8, "timestamp": pl.Int64})
    assert items.schema == pl.Schema({"item": pl.Int64, "title": pl.Utf8, "genre": pl.Utf8})
    assert items["item"].to_list() == list(range(1, SMALL.items + 1))
    assert inter["user"].min() >= 1 and inter["user"].max() <= SMALL.users
    assert inter["user"].n_unique() == SMALL.users  # every user has at least one interaction
    assert inter["item"].min() >= 1 and inter["item"].max() <= SMALL.items
    assert set(inter["rating"].unique().to_list()) <= {1, 2, 3, 4, 5}
    assert inter.null_count().sum_horizontal().item() == 0


def test_deterministic_per_seed(small):
    again = generate_log(SMALL)
    assert again[0].equals(small[0]) and again[1].equals(small[1])
    other = generate_log(SyntheticSpec(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert not other[0].equals(small[0])
    assert not other[1].equals(small[1])


def test_history_lengths_power_law(mid):
    inter, _ = mid
    lengths = inter.group_by("user").len()["len"].to_numpy()
    assert len(lengths) == MID.users
    assert lengths.min() >= 1
    assert lengths.max() <= MID.max_history
    assert abs(lengths.mean() - MID.mean_history) <= 0.1 * MID.mean_history
    # heavy tail: the median user is well below the mean, a few users are far above it
    assert np.median(lengths) < 0.6 * MID.mean_history
    assert lengths.max() > 10 * MID.mean_history


def test_history_lengths_edge_cases():
    rng = np.random.default_rng(0)
    clipped = history_lengths(5_000, 20.0, 30, 1.5, rng)
    assert clipped.min() >= 1 and clipped.max() <= 30
    assert abs(clipped.mean() - 20.0) < 1.0
    assert (history_lengths(100, 0.5, 10, 1.5, rng) == 1).all()  # mean below 1: everyone gets 1
    assert (history_lengths(100, 50.0, 10, 1.5, rng) == 10).all()  # mean above max: everyone at max
    assert len(history_lengths(0, 10.0, 10, 1.5, rng)) == 0


def test_time_order_sessions_and_ties(mid):
    inter, _ = mid
    ts = inter["timestamp"].to_numpy()
    assert (np.diff(ts) >= 0).all()  # a real log: in time order
    assert (np.diff(inter["user"].to_numpy()) != 0).mean() > 0.5  # users interleaved, not grouped
    assert ts.min() >= MID.start_time
    per_user = inter.with_row_index("row").sort(["user", "row"])
    same_user = per_user["user"].to_numpy()[1:] == per_user["user"].to_numpy()[:-1]
    gaps = np.diff(per_user["timestamp"].to_numpy())[same_user]
    assert (gaps >= 0).all()  # non-decreasing within each user
    tie_share = (gaps == 0).mean()
    assert 0.5 * MID.tie_rate < tie_share < 2 * MID.tie_rate
    # sessions: most steps are seconds to minutes apart, about 1 in mean_session_items is a long pause
    assert np.median(gaps) < 600
    long_pause = (gaps > 1800).mean()
    assert 0.5 / MID.mean_session_items < long_pause < 1.2 / MID.mean_session_items
    # users start spread over about start_spread_days
    first = per_user.group_by("user").agg(pl.col("timestamp").min())["timestamp"].to_numpy()
    assert first.max() - first.min() > 0.9 * MID.start_spread_days * 86400


def test_zipf_popularity(mid):
    inter, _ = mid
    counts = inter.group_by("item").len().sort("len", descending=True)
    top = counts.head(max(MID.items // 100, 1))
    assert top["len"].sum() / inter.height > 0.10
    # popularity is not id order
    assert not set(top["item"].to_list()) == set(range(1, top.height + 1))
    assert abs(np.corrcoef(counts["item"].to_numpy(), counts["len"].to_numpy())[0, 1]) < 0.2


def test_titles_safe_and_realistic(mid):
    _, items = mid
    titles = items["title"]
    assert titles.str.contains(r"^\S.* \((19|20)\d\d\)$").all()
    words = titles.str.replace(r" \(\d{4}\)$", "").str.split(" ").list.len()
    assert words.min() >= 1 and words.max() <= 8
    for sep in ["|", "::", "\t", "\n", "\r", "||", '"']:
        assert not titles.str.contains(sep, literal=True).any(), sep
    "".join(titles.to_list()).encode("latin-1")  # raises if not latin-1
    assert (titles.str.len_bytes() > titles.str.len_chars()).any()  # some non-ASCII letters on purpose
    check_titles_safe(titles)
    # about 1% of the items copy another item's title
    n_copies = items.height - titles.n_unique()
    assert n_copies == round(MID.duplicate_titles * MID.items)
    genres = set(items["genre"].str.split("|").explode().to_list())
    assert genres <= set(GENRES)


def test_check_titles_safe_rejects():
    for bad in ["A|B (1990)", "A::B (1990)", "A\tB", "A\nB", 'A "B"', "Ölçü ğ (1990)"]:
        with pytest.raises(ValueError):
            check_titles_safe(pl.Series([bad]))


# ---------------------------------------------------------------------------------------------
# writers


def _expected(inter: pl.DataFrame, items: pl.DataFrame):
    return inter.with_columns(pl.col("rating").cast(pl.Int64)), items


def _read_back(paths: dict[str, str], fmt: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    ip, tp = paths["interactions"], paths["items"]
    inter_schema = {"user": pl.Int64, "item": pl.Int64, "rating": pl.Int64, "timestamp": pl.Int64}
    if fmt == "recbole":
        di = pl.read_csv(ip, separator="\t", quote_char=None)
        assert di.columns == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
        dt = pl.read_csv(tp, separator="\t", quote_char=None, infer_schema=False)
        assert dt.columns == ["item_id:token", "movie_title:token_seq", "genre:token_seq"]
        di.columns = list(inter_schema)
        dt = dt.select(pl.col("item_id:token").cast(pl.Int64).alias("item"),
                       pl.col("movie_title:token_seq").alias("title"),
                       pl.col("genre:token_seq").str.replace_all(" ", "|").alias("genre"))
        return di.cast(inter_schema), dt
    if fmt == "movielens-100k":
        with open(ip, encoding="latin-1", newline="") as fh:
            rows = [line.rstrip("\n").split("\t") for line in fh]
        with open(tp, encoding="latin-1", newline="") as fh:
            fields = [line.rstrip("\n").split("|") for line in fh]
        assert all(len(f) == 5 + len(GENRES) for f in fields)
        assert all(f[2] == "01-Jan-" + f[1][-5:-1] and f[3] == "" and f[4].startswith("http") for f in fields)
        genre = ["|".join(g for g, flag in zip(GENRES, f[5:]) if flag == "1") for f in fields]
        dt = pl.DataFrame({"item": [int(f[0]) for f in fields], "title": [f[1] for f in fields], "genre": genre})
    elif fmt == "movielens-1m":
        with open(ip, encoding="latin-1", newline="") as fh:
            rows = [line.rstrip("\n").split("::") for line in fh]
        with open(tp, encoding="latin-1", newline="") as fh:
            fields = [line.rstrip("\n").split("::") for line in fh]
        assert all(len(f) == 3 for f in fields)
        dt = pl.DataFrame({"item": [int(f[0]) for f in fields], "title": [f[1] for f in fields],
                           "genre": [f[2] for f in fields]})
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        return (pl.read_csv(ip, separator=sep).cast(inter_schema),
                pl.read_csv(tp, separator=sep, schema_overrides={"title": pl.Utf8, "genre": pl.Utf8}))
    elif fmt == "parquet":
        return pl.read_parquet(ip), pl.read_parquet(tp)
    elif fmt == "jsonl":
        return pl.read_ndjson(ip).cast(inter_schema), pl.read_ndjson(tp)
    else:
        raise AssertionError(fmt)
    assert all(len(r) == 4 for r in rows)
    di = pl.DataFrame(np.array(rows, dtype=np.int64), schema=list(inter_schema), orient="row")
    return di, dt


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_log_round_trip(small, tmp_path, fmt):
    inter, items = small
    assert items["title"].str.contains(",").any()  # CSV quoting is exercised
    folder = tmp_path / "mydata"
    paths = write_log(inter, items, folder, fmt)
    assert set(paths) == {"interactions", "items"}
    if fmt == "recbole":
        assert paths == {"interactions": str(folder / "mydata.inter"), "items": str(folder / "mydata.item")}
    got_inter, got_items = _read_back(paths, fmt)
    if fmt == "parquet":
        assert got_inter.equals(inter) and got_items.equals(items)
        return
    want_inter, want_items = _expected(inter, items)
    assert got_inter.equals(want_inter)
    assert got_items.equals(want_items)
    if fmt.startswith("movielens"):  # latin-1 on disk: one byte per accented letter
        raw = open(paths["items"], "rb").read()
        assert any(b >= 0x80 for b in raw)
        raw.decode("latin-1")
        assert "\u00c3" not in raw.decode("latin-1")  # not UTF-8 bytes misread


def test_write_log_unknown_format(small, tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        write_log(small[0], small[1], tmp_path, "excel")


def test_write_items_title_file(small, tmp_path):
    _, items = small
    path = write_items_title_file(items, tmp_path / "id2title.txt")
    with open(path, encoding="utf-8") as fh:
        pairs = [line.rstrip("\n").partition("||") for line in fh]
    assert [int(k) for k, _, _ in pairs] == items["item"].to_list()
    assert [t for _, sep, t in pairs if sep] == items["title"].to_list()
