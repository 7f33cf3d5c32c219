"""Synthetic interaction logs: realistic enough to exercise the data pipeline, fast enough for benchmarks.

`generate_log(spec)` returns two polars frames:

* interactions: user (Int64), item (Int64), rating (Int8, 1..5), timestamp (Int64, unix seconds), in the
  order of a real log: sorted by time, so users are interleaved. Ties in time keep each user's own order.
* items: item (Int64), title (Utf8), genre (Utf8, MovieLens genre names joined by '|').

What it models, all with vectorised numpy (no Python loop per interaction or per user):

* history lengths: a clipped power law (Lomax, tail exponent `length_alpha`), at least 1, at most
  `max_history`, scaled so that the total is `round(users * mean_history)`;
* items: Zipf-like popularity with exponent `zipf_a`, over a random permutation of item ids;
* time: each user starts at a random point in `start_spread_days`, then moves in sessions of a few items
  (`mean_session_items`) a minute or two apart (`within_session_gap`), sessions separated by exponential
  pauses around `session_gap`; a share `tie_rate` of steps is zero seconds long (exact ties, on purpose);
* titles: 1..8 words from small latin-1 word lists plus a year, e.g. "The Silent River (1994)", distinct but
  for a share `duplicate_titles` of items that copy another item's title, as remakes do in real catalogs.

`write_log(interactions, items, folder, fmt)` writes the log in the formats the sharding tool reads, and
`write_items_title_file(items, path)` writes the paper's `id||title` file.

`generate_needle_log(spec)` is a controlled task instead of a realistic log: each user's one target is
set by a single "needle" item k positions before it (through a fixed random needle -> target map), the
rest of the history is Zipf filler. Only a model that reads item k can beat chance, so it measures what
a prompt layout keeps of old items (bench/needle.py) and catches a patch path that loses them.
`write_needle_log` writes it as a table with its own split column (`--split-col split`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import polars as pl

__all__ = [
    "FORMATS",
    "GENRES",
    "NeedleSpec",
    "SyntheticSpec",
    "generate_log",
    "generate_needle_log",
    "history_lengths",
    "write_items_title_file",
    "write_log",
    "write_needle_log",
]


@dataclass
class SyntheticSpec:
    users: int = 1000
    items: int = 500
    mean_history: float = 50.0  # mean interactions per user
    max_history: int = 20_000  # lengths: clipped power law, min 1
    zipf_a: float = 1.1  # item popularity exponent
    seed: int = 0
    start_time: int = 1_000_000_000  # unix seconds
    session_gap: int = 3 * 3600  # mean pause between sessions, seconds
    # finer knobs (defaults give a MovieLens/Amazon-like log)
    length_alpha: float = 1.5  # tail exponent of the history-length power law
    mean_session_items: float = 4.0  # mean interactions per session
    within_session_gap: float = 90.0  # mean seconds between interactions inside a session
    tie_rate: float = 0.01  # share of steps inside a user's history that take zero seconds
    start_spread_days: int = 730  # users start uniformly over this many days after start_time
    duplicate_titles: float = 0.01  # share of items whose title copies another item's title
    # which item ids are popular (the Zipf ranks' order); None: drawn from `seed`. Logs generated in
    # parts with their own seeds share one popularity order by sharing this (bench/shard.py)
    popularity_seed: int | None = None


# MovieLens-100K genre list, in u.item flag order ("unknown" first).
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]

FORMATS = ("recbole", "movielens-100k", "movielens-1m", "csv", "tsv", "parquet", "jsonl")

# Separators of the formats written here; titles never contain them ('"' too: the RecBole and MovieLens
# readers parse without quoting, and a quote would make polars quote the field).
_FORBIDDEN_IN_TITLES = ["|", "::", "\t", "\n", "\r", '"']

# Small word lists. All latin-1; a few accented words so the MovieLens writers' encoding is exercised.
_ADJECTIVES = (
    "Silent Dark Lost Golden Hidden Broken Last First Secret Wild Little Great Red Blue Black White Eternal "
    "Crimson Frozen Burning Lonely Final Forgotten Endless Sweet Bitter Quiet Dangerous Perfect Strange "
    "Electric Savage Gentle Midnight Distant Hollow Brave Fallen Rising Young Old Naked Deadly Happy Sacred "
    "Iron Silver Velvet Wicked Naïve Über Blonde Mad Invisible Crazy American French Royal"
).split()
_NOUNS = (
    "River Night City Heart Road Dream Star Sea Moon Sun Storm Garden House Girl Boy King Queen Kingdom "
    "Shadow Fire Rain Wind Mountain Island Forest Game Story Life Love War Man Woman Family Friend Stranger "
    "Ghost Angel Devil Hunter Soldier Detective Doctor Witness Bride Summer Winter Spring Autumn Train Bridge "
    "Empire Legend Journey Escape Return Revenge Secret Memory Paradise Highway Harbor Castle Dragon Wolf "
    "Horse Tiger Mirror Window Door Song Dance Letter Promise Café Señor Château Fiancée Noël Mañana Façade "
    "Résumé Amélie Øresund Night's Heaven's Devil's Summer's"
).split()
_CONNECTORS = "of and in at for on with".split()
_THE = "The"


def _vocabulary() -> tuple[list[str], int, int, int]:
    """Base words and their ':' and ',' variants; returns (vocab, n_adj, n_nouns, n_base)."""
    base = _ADJECTIVES + _NOUNS + _CONNECTORS + [_THE]
    vocab = base + [w + ":" for w in base] + [w + "," for w in base]
    return vocab, len(_ADJECTIVES), len(_NOUNS), len(base)


# ---------------------------------------------------------------------------------------------
# history lengths


def history_lengths(users: int, mean: float, max_len: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Clipped power-law (Lomax) lengths in [1, max_len] whose total is round(users * mean) where possible."""
    if users <= 0:
        return np.zeros(0, dtype=np.int64)
    max_len = max(int(max_len), 1)
    target = float(np.clip(mean, 1.0, max_len))
    # Unit Lomax draws: X = U^(-1/alpha) - 1 (heavy tail for small alpha); length = 1 + floor(scale * X).
    x = rng.random(users) ** (-1.0 / alpha) - 1.0
    x = np.minimum(x, float(max_len))  # keep the products finite; clipping below does the rest

    def lengths_for(scale: float) -> np.ndarray:
        return np.minimum(1.0 + np.floor(scale * x), max_len)

    lo, hi = 0.0, 1.0
    while lengths_for(hi).mean() < target and hi < 1e12:
        hi *= 2.0
    for _ in range(60):  # the mean is monotone in the scale: bisect
        mid = 0.5 * (lo + hi)
        if lengths_for(mid).mean() < target:
            lo = mid
        else:
            hi = mid
    lengths = lengths_for(hi).astype(np.int64)
    # Floors make the total a step function of the scale: nudge single users to hit the total exactly.
    diff = int(round(users * target)) - int(lengths.sum())
    if diff:
        eligible = np.flatnonzero(lengths < max_len) if diff > 0 else np.flatnonzero(lengths > 1)
        if len(eligible):
            pick = rng.choice(eligible, size=min(abs(diff), len(eligible)), replace=False)
            lengths[pick] += 1 if diff > 0 else -1
    return lengths


# ---------------------------------------------------------------------------------------------
# items: titles and genres


def _draw_titles(m: int, rng: np.random.Generator, min_words: int = 1) -> pl.Series:
    """M random titles "Words Like These (1994)"; 1..8 words (a few ", The" and ": " forms)."""
    vocab, n_adj, n_nouns, n_base = _vocabulary()
    i_conn = n_adj + n_nouns
    i_the = n_base - 1
    probs = np.array([0.12, 0.28, 0.25, 0.15, 0.09, 0.06, 0.03, 0.02])
    probs[: min_words - 1] = 0.0
    k = rng.choice(np.arange(1, 9), size=m, p=probs / probs.sum())
    pos = np.arange(9)[None, :]
    # adjectives or nouns anywhere, nouns last, connectors now and then in the middle
    words = rng.integers(0, n_adj + n_nouns, size=(m, 9))
    last = n_adj + rng.integers(0, n_nouns, size=m)
    conn = (rng.random((m, 9)) < 0.12) & (pos > 0) & (pos < k[:, None] - 1)
    words = np.where(conn, i_conn + rng.integers(0, len(_CONNECTORS), size=(m, 9)), words)
    words[np.arange(m), k - 1] = last
    lead_the = (k >= 2) & (rng.random(m) < 0.3)
    words[lead_the, 0] = i_the
    # "Silent River, The": drop the leading article, put it after a comma at the end
    postpose = lead_the & (rng.random(m) < 0.15)
    # "Dark Road: Return" subtitles, on a word that is neither the last nor a connector
    colon_at = (rng.random(m) * np.maximum(k - 1, 1)).astype(np.int64)
    colon = (k >= 3) & ~postpose & (rng.random(m) < 0.05)
    colon &= words[np.arange(m), colon_at] < i_conn
    words[np.flatnonzero(colon), colon_at[colon]] += n_base
    words[np.flatnonzero(postpose), k[postpose] - 1] += 2 * n_base
    words[postpose, 0] = -1
    words[:, 8] = np.where(postpose, i_the, -1)
    words[:, :8][pos[:, :8] >= k[:, None]] = -1
    year = np.clip(2023 - np.floor(rng.exponential(15.0, size=m)), 1920, 2023).astype(np.int64)

    vocab_s = pl.Series(vocab, dtype=pl.Utf8)
    cols = []
    for j in range(9):
        idx = pl.Series(words[:, j], dtype=pl.Int64)
        cols.append(vocab_s.gather(idx.set(idx < 0, None)).alias(f"w{j}"))
    frame = pl.DataFrame(cols + [pl.Series("year", year)])
    return frame.select(
        pl.concat_str([pl.concat_str([pl.col(f"w{j}") for j in range(9)], separator=" ", ignore_nulls=True),
                       pl.lit(" ("), pl.col("year").cast(pl.Utf8), pl.lit(")")]).alias("title")
    )["title"]


def _distinct_titles(n: int, rng: np.random.Generator) -> pl.Series:
    titles = _draw_titles(n, rng)
    for round_ in range(100):
        dup = np.flatnonzero(~titles.is_first_distinct().to_numpy())
        if not len(dup):
            return titles
        # short titles collide most: redraw the later copies, longer and longer
        redrawn = _draw_titles(len(dup), rng, min_words=min(1 + round_, 4))
        titles = titles.scatter(dup, redrawn)
    # Practically unreachable: number the copies left (no word holds a digit, so they become unique).
    dup = np.flatnonzero(~titles.is_first_distinct().to_numpy())
    fixed = [titles[int(i)].replace(" (", f" {int(i)} (") for i in dup]
    return titles.scatter(dup, pl.Series(fixed, dtype=pl.Utf8))


def _draw_genres(n: int, rng: np.random.Generator) -> pl.Series:
    """1..3 genres per item from the 18 named MovieLens genres, alphabetical, joined by '|'."""
    named = np.arange(1, len(GENRES))
    k = rng.choice([1, 2, 3], size=n, p=[0.5, 0.35, 0.15])
    pick = np.argsort(rng.random((n, len(named))), axis=1)[:, :3]
    pick = np.sort(np.where(np.arange(3)[None, :] < k[:, None], pick, len(named)), axis=1)  # unused -> end
    genre_s = pl.Series(GENRES[1:], dtype=pl.Utf8)
    cols = []
    for j in range(3):
        idx = pl.Series(pick[:, j], dtype=pl.Int64)
        cols.append(genre_s.gather(idx.set(idx >= len(named), None)).alias(f"g{j}"))
    return pl.DataFrame(cols).select(
        pl.concat_str([pl.col(f"g{j}") for j in range(3)], separator="|", ignore_nulls=True).alias("genre")
    )["genre"]


def _items_frame(spec: SyntheticSpec, rng: np.random.Generator) -> pl.DataFrame:
    n = spec.items
    titles = _distinct_titles(n, rng)
    n_dup = int(round(spec.duplicate_titles * n))
    n_dup = min(n_dup, n // 2)
    if n_dup:
        perm = rng.permutation(n)
        targets, sources = perm[:n_dup], rng.choice(perm[n_dup:], size=n_dup)
        titles = titles.scatter(targets, titles.gather(sources))
    return pl.DataFrame({
        "item": pl.Series(np.arange(1, n + 1, dtype=np.int64)),
        "title": titles,
        "genre": _draw_genres(n, rng),
    })


# ---------------------------------------------------------------------------------------------
# interactions


def _zipf_items(n_rows: int, n_items: int, a: float, rng: np.random.Generator,
                popularity_seed: int | None = None) -> np.ndarray:
    weights = np.arange(1, n_items + 1, dtype=np.float64) ** (-a)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n_rows), side="right")
    np.minimum(ranks, n_items - 1, out=ranks)  # guards the float edge u == cdf[-1]
    id_of_rank = rng.permutation(n_items).astype(np.int64) + 1  # popularity is not id order
    if popularity_seed is not None:  # drawn from RNG above all the same, so other draws do not move
        id_of_rank = np.random.default_rng(popularity_seed).permutation(n_items).astype(np.int64) + 1
    return id_of_rank[ranks]


def _ratings(users_idx: np.ndarray, items: np.ndarray, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """MovieLens-like ratings (mostly 3-4): item quality + user bias + noise, rounded into 1..5."""
    n = len(items)
    quality = rng.normal(0.0, 0.5, size=spec.items + 1).astype(np.float32)
    bias = rng.normal(0.0, 0.4, size=spec.users).astype(np.float32)
    score = rng.standard_normal(n, dtype=np.float32)
    score *= 0.8
    score += quality[items]
    score += bias[users_idx]
    score += 3.55
    np.rint(score, out=score)
    np.clip(score, 1, 5, out=score)
    return score.astype(np.int8)


def _timestamps(lengths: np.ndarray, starts: np.ndarray, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Per-user non-decreasing times, laid out user block after user block."""
    n = int(lengths.sum())
    new_session = rng.random(n, dtype=np.float32) < 1.0 / max(spec.mean_session_items, 1.0)
    gap_scale = np.where(new_session, np.float32(spec.session_gap), np.float32(spec.within_session_gap))
    del new_session
    gaps_f = rng.standard_exponential(n, dtype=np.float32)
    gaps_f *= gap_scale
    del gap_scale
    gaps = gaps_f.astype(np.int64)
    del gaps_f
    gaps += 1  # at least a second, so that ties come only from tie_rate below
    gaps[rng.random(n, dtype=np.float32) < spec.tie_rate] = 0
    block_start = np.cumsum(lengths) - lengths  # lengths are >= 1
    gaps[block_start] = 0  # the first interaction of a user sits at its start time
    np.cumsum(gaps, out=gaps)
    gaps += np.repeat(starts - gaps[block_start], lengths)
    return gaps


def generate_log(spec: SyntheticSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A synthetic (interactions, items) pair; deterministic for a given spec (seed included)."""
    if spec.users < 0 or spec.items < 1:
        raise ValueError(f"need users >= 0 and items >= 1, got users={spec.users}, items={spec.items}")
    rng = np.random.default_rng(spec.seed)
    items = _items_frame(spec, rng)

    lengths = history_lengths(spec.users, spec.mean_history, spec.max_history, spec.length_alpha, rng)
    # Users' blocks are laid out in a random order, so that users tied in time come in random order.
    block_user = rng.permutation(spec.users).astype(np.int64)
    lengths_by_block = lengths[block_user]
    span = max(int(spec.start_spread_days) * 86400, 1)
    starts = spec.start_time + rng.integers(0, span, size=spec.users, dtype=np.int64)

    block_of_row = np.repeat(np.arange(spec.users, dtype=np.int32), lengths_by_block)
    user_idx = block_user[block_of_row]  # 0-based user index per row
    del block_of_row
    n_rows = len(user_idx)
    item = _zipf_items(n_rows, spec.items, spec.zipf_a, rng, spec.popularity_seed)
    rating = _ratings(user_idx, item, spec, rng)
    timestamp = _timestamps(lengths_by_block, starts[block_user], spec, rng)

    # A real log is in time order: stable sort, so a user's tied interactions keep their order.
    order = np.argsort(timestamp, kind="stable")
    user_idx += 1  # 1-based ids, like MovieLens
    interactions = pl.DataFrame({
        "user": pl.Series(user_idx[order], dtype=pl.Int64),
        "item": pl.Series(item[order], dtype=pl.Int64),
        "rating": pl.Series(rating[order], dtype=pl.Int8),
        "timestamp": pl.Series(timestamp[order], dtype=pl.Int64),
    })
    return interactions, items


# ---------------------------------------------------------------------------------------------
# writers


def check_titles_safe(titles: pl.Series) -> None:
    """Raise ValueError if a title is not latin-1 or holds a separator of the formats written here."""
    for sep in _FORBIDDEN_IN_TITLES:
        bad = titles.str.contains(sep, literal=True)
        if bad.any():
            raise ValueError(f"title {titles.filter(bad)[0]!r} contains the separator {sep!r}")
    if titles.str.ends_with(":").any() or titles.str.starts_with(":").any():
        raise ValueError("a title starting or ending in ':' would merge with the '::' separator")
    try:
        "\n".join(titles.to_list()).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a title is not latin-1: {exc}") from None


def _write_text(df: pl.DataFrame, path: str, separator: str, header: bool, encoding: str = "utf-8") -> None:
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        df.write_csv(path, separator=separator, include_header=header, quote_style="never")
        return
    buf = io.BytesIO()
    df.write_csv(buf, separator=separator, include_header=header, quote_style="never")
    with open(path, "wb") as fh:
        fh.write(buf.getvalue().decode("utf-8").encode(encoding))


def _write_joined(df: pl.DataFrame, path: str, separator: str, encoding: str = "utf-8",
                  chunk_rows: int = 2_000_000) -> None:
    """One line per row, fields joined by a multi-character SEPARATOR (MovieLens-1M's '::').

    Written in chunks, so that the joined text of a 20M-row log never sits in memory at once."""
    with open(path, "wb") as fh:
        for start in range(0, max(df.height, 1), chunk_rows):
            part = df.slice(start, chunk_rows)
            line = part.select(pl.concat_str([pl.col(c).cast(pl.Utf8) for c in df.columns],
                                             separator=separator).alias("l"))
            buf = io.BytesIO()
            line.write_csv(buf, include_header=False, quote_style="never")
            data = buf.getvalue()
            fh.write(data if encoding == "utf-8" else data.decode("utf-8").encode(encoding))


def write_log(interactions: pl.DataFrame, items: pl.DataFrame, folder: str | os.PathLike, fmt: str) -> dict[str, str]:
    """Write the log in format FMT under FOLDER (created if needed); returns {"interactions": path, "items": path}."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    inter = interactions.select("user", "item", "rating", "timestamp")
    it = items.select("item", "title", "genre")
    if fmt in ("recbole", "movielens-100k", "movielens-1m", "tsv"):
        check_titles_safe(it["title"])

    if fmt == "recbole":
        name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
        ip, tp = os.path.join(folder, f"{name}.inter"), os.path.join(folder, f"{name}.item")
        _write_text(inter.rename({"user": "user_id:token", "item": "item_id:token", "rating": "rating:float",
                                  "timestamp": "timestamp:float"}), ip, "\t", header=True)
        _write_text(it.select(pl.col("item").alias("item_id:token"), pl.col("title").alias("movie_title:token_seq"),
                              pl.col("genre").str.replace_all("|", " ", literal=True).alias("genre:token_seq")),
                    tp, "\t", header=True)
    elif fmt == "movielens-100k":
        ip, tp = os.path.join(folder, "u.data"), os.path.join(folder, "u.item")
        _write_text(inter, ip, "\t", header=False)  # integers only: ASCII, which is latin-1 too
        genre_list = pl.col("genre").str.split("|")
        table = it.select(
            "item",
            "title",
            pl.concat_str([pl.lit("01-Jan-"), pl.col("title").str.extract(r"\((\d{4})\)$", 1)]).alias("release"),
            pl.lit("").alias("video_release"),
            pl.concat_str([pl.lit("http://us.imdb.com/M/title-exact?"),
                           pl.col("title").str.replace_all(" ", "%20", literal=True)]).alias("url"),
            *[genre_list.list.contains(g).cast(pl.Int8).alias(f"g{i}") for i, g in enumerate(GENRES)],
        )
        _write_text(table, tp, "|", header=False, encoding="latin-1")
    elif fmt == "movielens-1m":
        ip, tp = os.path.join(folder, "ratings.dat"), os.path.join(folder, "movies.dat")
        _write_joined(inter, ip, "::")
        _write_joined(it, tp, "::", encoding="latin-1")
    elif fmt in ("csv", "tsv", "parquet", "jsonl"):
        ip, tp = os.path.join(folder, f"interactions.{fmt}"), os.path.join(folder, f"items.{fmt}")
        for df, path in ((inter, ip), (it, tp)):
            if fmt == "parquet":
                df.write_parquet(path)
            elif fmt == "jsonl":
                df.write_ndjson(path)
            else:
                df.write_csv(path, separator="," if fmt == "csv" else "\t")
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return {"interactions": ip, "items": tp}


def write_items_title_file(items: pl.DataFrame, path: str | os.PathLike) -> str:
    """The paper's id2title.txt: one `id||title` line per item, UTF-8. Returns the path."""
    path = os.fspath(path)
    if items["title"].str.contains("||", literal=True).any() or items["title"].str.contains("\n").any():
        raise ValueError("a title contains '||' or a newline, which id2title.txt cannot hold")
    lines = items.select(pl.concat_str([pl.col("item").cast(pl.Utf8), pl.col("title")], separator="||").alias("l"))
    _write_text(lines, path, "\x1f", header=False)
    return path


# ---------------------------------------------------------------------------------------------
# the needle task


@dataclass
class NeedleSpec:
    users: int = 2000
    min_history: int = 50  # history items before the target (at least the largest distance)
    max_history: int = 2000  # lengths are log-uniform in [max(min_history, k), max_history]
    distances: tuple[int, ...] = (3, 10, 30, 100, 300)  # k: the needle is the k-th item before the target
    needles: int = 32  # needle items, each mapped to its own target item
    fillers: int = 500  # the items of the rest of a history (Zipf)
    zipf_a: float = 1.1
    # Needle titles start with a word no other title has: finding the needle is then easy, and the
    # task measures what a layout keeps of its identity (the rest of its title)
    needle_marker: str | None = "Beacon"
    val_users: float = 0.05  # shares of users whose target is a val / test example; the rest train
    test_users: float = 0.15
    seed: int = 0

    def check(self) -> None:
        if not self.distances or min(self.distances) < 1:
            raise ValueError(f"distances must be positive integers; got {self.distances}")
        if self.users < 1 or self.needles < 1 or self.fillers < 1:
            raise ValueError("users, needles and fillers must be >= 1")
        if self.max_history < max(self.distances) or self.min_history < 1 or self.min_history > self.max_history:
            raise ValueError(f"need 1 <= min_history <= max_history and max_history >= the largest distance "
                             f"({max(self.distances)}); got {self.min_history}, {self.max_history}")
        if not 0 <= self.val_users + self.test_users < 1:
            raise ValueError("val_users + test_users must be in [0, 1)")


NEEDLE_ROLES = ("filler", "needle", "target")


def generate_needle_log(spec: NeedleSpec) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(interactions, items, users) of the needle task; deterministic for a given spec.

    interactions: user, item, timestamp (a minute apart, so time order is history order) and split:
    null on history rows, train / val / test on each user's last row, the target. items: item,
    title (distinct), role (filler, needle or target; ids do not reveal it). users: user, split, k,
    history (items before the target), needle, target."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    n_items = spec.fillers + 2 * spec.needles
    ids = rng.permutation(n_items).astype(np.int64) + 1
    fillers, needles = ids[:spec.fillers], ids[spec.fillers:spec.fillers + spec.needles]
    target_of = ids[spec.fillers + spec.needles:]  # needle j -> target_of[j]
    role = np.empty(n_items + 1, dtype=np.int64)
    role[fillers], role[needles], role[target_of] = 0, 1, 2
    titles = _distinct_titles(n_items, rng)
    if spec.needle_marker:
        titles = pl.Series("title", [f"{spec.needle_marker} {t}" if r == 1 else t
                                     for t, r in zip(titles.to_list(), role[1:])], dtype=pl.Utf8)
    items = pl.DataFrame({"item": np.arange(1, n_items + 1, dtype=np.int64),
                          "title": titles,
                          "role": pl.Series([NEEDLE_ROLES[r] for r in role[1:]], dtype=pl.Utf8)})

    u = spec.users
    k = rng.choice(np.asarray(spec.distances, dtype=np.int64), size=u)
    lo = np.maximum(spec.min_history, k).astype(np.float64)
    length = np.floor(np.exp(np.log(lo) + rng.random(u) * (np.log(spec.max_history + 1) - np.log(lo))))
    length = np.clip(length, lo, spec.max_history).astype(np.int64)  # history items before the target
    which = rng.integers(0, spec.needles, size=u)
    rows = length + 1
    offsets = np.concatenate([[0], np.cumsum(rows)])
    item = _zipf_items(int(rows.sum()), spec.fillers, spec.zipf_a, rng)
    item = fillers[item - 1]  # Zipf ranks over the filler pool
    item[offsets[:-1] + length - k] = needles[which]
    item[offsets[1:] - 1] = target_of[which]
    n_test = int(round(spec.test_users * u))
    n_val = int(round(spec.val_users * u))
    split = np.array(["train"] * u, dtype=object)
    perm = rng.permutation(u)
    split[perm[:n_test]], split[perm[n_test:n_test + n_val]] = "test", "val"

    user_of_row = np.repeat(np.arange(1, u + 1, dtype=np.int64), rows)
    position = np.arange(len(item), dtype=np.int64) - np.repeat(offsets[:-1], rows)
    row_split = np.full(len(item), None, dtype=object)
    row_split[offsets[1:] - 1] = split
    interactions = pl.DataFrame({
        "user": pl.Series(user_of_row), "item": pl.Series(item),
        "timestamp": pl.Series(1_000_000_000 + 60 * position + 86_400 * user_of_row),
        "split": pl.Series(row_split.tolist(), dtype=pl.Utf8),
    })
    users = pl.DataFrame({"user": np.arange(1, u + 1, dtype=np.int64), "split": pl.Series(split.tolist(), dtype=pl.Utf8),
                          "k": k, "history": length, "needle": needles[which], "target": target_of[which]})
    return interactions, items, users


def write_needle_log(spec: NeedleSpec, folder: str | os.PathLike) -> dict[str, str]:
    """interactions.parquet, items.parquet and users.parquet (the task's answers) under FOLDER.

    Shard it with: tools/shard_histories.py --format table --input FOLDER/interactions.parquet
    --items FOLDER/items.parquet --user-col user --item-col item --split-col split"""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.parquet") for name in ("interactions", "items", "users")}
    for name, frame in zip(paths, generate_needle_log(spec)):
        frame.write_parquet(paths[name])
    return paths
