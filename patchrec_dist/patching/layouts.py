"""Which history items a PatchRec prompt feeds as text, as item patches, or as session patches.

A history of n items (positions 0..n-1, oldest first) is cut into segments, in prompt order:

- ``text``: one item, fed as its title tokens;
- ``item``: one item, fed as one position (mean of its title's token embeddings);
- ``session``: several consecutive items, fed as one position (mean of their item patches).

Every segment is followed by one separator, so a segment costs (title tokens or 1) + 1 positions
(`positions_fed`). The stages and their exact rules are in the project reference
(../shared/docs/reference.md, "Stages and their layouts"); `layout_budget` is this package's
extension for histories far longer than the paper's 100 items.

Everything here is numpy and plain Python (no torch, no tokenizer): it runs per example on
DataLoader workers. The core builds a compact array form (`LayoutArrays`: kind code, start, end per
segment); the `Segment` list is the readable form built from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import numpy as np

SegmentKind = Literal["text", "item", "session"]
Stage = Literal["text", "ppt", "pft-i", "pft-s", "budget"]
PptSchedule = Literal["linear", "constant", "cosine"]

#: Kind codes of the array form; ``KIND_NAMES[code]`` is the `SegmentKind`.
TEXT, ITEM, SESSION = 0, 1, 2
KIND_NAMES: tuple[SegmentKind, ...] = ("text", "item", "session")
KIND_CODES: dict[str, int] = {name: code for code, name in enumerate(KIND_NAMES)}
STAGES: tuple[str, ...] = get_args(Stage)
PPT_SCHEDULES: tuple[str, ...] = get_args(PptSchedule)

#: Positions a patch costs: the patch itself and its separator.
PATCH_COST = 2
#: The smallest `max_positions` a budget layout accepts: the whole history as one session patch
#: and its separator (a non-empty history cannot be fed in fewer positions).
MIN_BUDGET_POSITIONS = PATCH_COST


@dataclass(frozen=True, slots=True)
class Segment:
    """One history segment of the prompt. ``items`` are history positions, ascending."""

    kind: SegmentKind
    items: tuple[int, ...]  # text and item segments hold exactly one position


def _knob(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class LayoutSpec:
    """A stage and its parameters: the one object passed from config to the data pipeline.

    Also the `layout` section of every config that lays out prompts (training, evaluation,
    recommendation): each field is a command-line flag there (--stage, --group-size, ...), so a
    new knob is one field here."""

    stage: Stage = _knob("pft-s", "layout: text, ppt, pft-i, pft-s or budget", choices=STAGES)
    max_text_items: int | None = _knob(None, "text: keep only the most recent K items (baseline truncation)")
    item_len: int = _knob(5, "pft-i: how many recent items stay text")
    group_size: int = _knob(5, "pft-s: g (text items = item patches = items per session patch); budget: its start shape")
    max_positions: int | None = _knob(None, "budget: history positions per example (segments + separators)")
    session_gap: float | None = _knob(None, "pft-s/budget: cut sessions where the user paused this many seconds")
    max_session_items: int | None = _knob(None, "pft-s/budget: split time-gap sessions longer than this")

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {self.stage!r}")
        if self.max_text_items is not None:
            _check_int("max_text_items", self.max_text_items, 0)
        _check_int("item_len", self.item_len, 0)
        _check_int("group_size", self.group_size, 1)
        if self.stage == "budget":
            if self.max_positions is None:
                raise ValueError("stage 'budget' needs max_positions")
            _check_budget(self.max_positions)
        _check_sessions(self.session_gap, self.max_session_items)


class LayoutArrays(NamedTuple):
    """Compact layout: per segment, a kind code (TEXT/ITEM/SESSION) and the item range [start, end)."""

    kinds: np.ndarray  # int8
    starts: np.ndarray  # int64
    ends: np.ndarray  # int64, exclusive


# ---------------------------------------------------------------------------------------------
# validation


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _check_budget(max_positions: object) -> None:
    if isinstance(max_positions, bool) or not isinstance(max_positions, (int, np.integer)):
        raise ValueError(f"max_positions must be an integer; got {max_positions!r}")
    if max_positions < MIN_BUDGET_POSITIONS:
        raise ValueError(
            f"max_positions={max_positions} is below the minimum of {MIN_BUDGET_POSITIONS} "
            "(one session patch holding the whole history, plus its separator)"
        )


def _check_sessions(session_gap: float | None, max_session_items: int | None) -> None:
    if session_gap is not None and not (isinstance(session_gap, (int, float, np.number)) and session_gap >= 0):
        raise ValueError(f"session_gap must be a number of seconds >= 0; got {session_gap!r}")
    if max_session_items is not None:
        if session_gap is None:
            # Fixed-size sessions already have size g; a cap there is almost surely a config slip.
            raise ValueError("max_session_items only applies to time-gap sessions; set session_gap too")
        _check_int("max_session_items", max_session_items, 1)


def _times_array(times: Sequence[float] | np.ndarray | None, n: int, session_gap: float | None) -> np.ndarray | None:
    if session_gap is None:
        return None
    if times is None:
        raise ValueError("session_gap is set but times is None: time-gap sessions need the item timestamps")
    arr = np.asarray(times, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"times must hold one timestamp per history item ({n}); got shape {arr.shape}")
    return arr


def _lens_array(title_lens: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(title_lens)
    if arr.shape != (n,):
        raise ValueError(f"title_lens must hold one token count per history item ({n}); got shape {arr.shape}")
    if n and arr.dtype.kind not in "iu":
        raise ValueError(f"title_lens must be integers; got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n and arr.min() < 0:
        raise ValueError("title_lens must be >= 0")
    return arr


def _check_n(n: object) -> None:
    _check_int("n", n, 0)


# ---------------------------------------------------------------------------------------------
# array building blocks

_EMPTY_I64 = np.zeros(0, dtype=np.int64)


def _assemble(s_starts: np.ndarray, s_ends: np.ndarray, first: int, n_item: int, n: int) -> LayoutArrays:
    """Sessions (given), then item patches for [first, first+n_item), then text up to n."""
    ns = s_starts.shape[0]
    kinds = np.empty(ns + n - first, dtype=np.int8)
    kinds[:ns] = SESSION
    kinds[ns : ns + n_item] = ITEM
    kinds[ns + n_item :] = TEXT
    singles = np.arange(first, n + 1, dtype=np.int64)
    starts = np.concatenate((s_starts, singles[:-1]))
    ends = np.concatenate((s_ends, singles[1:]))
    return LayoutArrays(kinds, starts, ends)


def _fixed_chunks(m: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut [0, m) into chunks of `size` aligned from the recent end (the oldest chunk is partial)."""
    if m <= 0:
        return _EMPTY_I64, _EMPTY_I64
    count = -(-m // size)
    ends = m - size * np.arange(count - 1, -1, -1, dtype=np.int64)
    return np.maximum(ends - size, 0), ends


def _split_from_end(starts: np.ndarray, ends: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Split every session longer than `cap` into chunks of `cap` aligned from its recent end."""
    counts = -(-(ends - starts) // cap)
    if starts.shape[0] == 0 or counts.max() == 1:
        return starts, ends
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    first = np.cumsum(counts) - counts
    from_end = counts[owner] - 1 - (np.arange(owner.shape[0]) - first[owner])
    c_ends = ends[owner] - from_end * cap
    return np.maximum(starts[owner], c_ends - cap), c_ends


def _gap_boundaries(times: np.ndarray, m: int, threshold: float) -> np.ndarray:
    """Positions p in 1..m-1 that start a new session: times[p] - times[p-1] > threshold."""
    return np.flatnonzero(np.diff(times[:m]) > threshold) + 1


def _time_sessions(times: np.ndarray, m: int, threshold: float, cap: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Time-gap sessions of [0, m); sessions longer than `cap` are split from their recent end."""
    if m <= 0:
        return _EMPTY_I64, _EMPTY_I64
    bounds = _gap_boundaries(times, m, threshold)
    starts = np.concatenate(([0], bounds)).astype(np.int64)
    ends = np.concatenate((bounds, [m])).astype(np.int64)
    return (starts, ends) if cap is None else _split_from_end(starts, ends, cap)


def _time_session_count(times: np.ndarray, m: int, threshold: float, cap: int | None) -> int:
    if m <= 0:
        return 0
    bounds = _gap_boundaries(times, m, threshold)
    if cap is None:
        return int(bounds.shape[0]) + 1
    edges = np.concatenate(([0], bounds, [m]))
    return int((-(-np.diff(edges) // cap)).sum())


def _prefix_session_counter(
    m_max: int, group_size: int, times: np.ndarray | None, session_gap: float | None, cap: int | None
) -> Callable[[np.ndarray], np.ndarray]:
    """A function giving, for prefix lengths m <= m_max, how many natural sessions [0, m) has.

    Natural sessions: g items each from the recent end, or time-gap sessions (split at `cap`).
    The time-gap bookkeeping is done once, so each query is a couple of vector operations.
    """
    if session_gap is None:
        return lambda m: -(-m // group_size)
    if m_max <= 0:
        return np.zeros_like
    assert times is not None
    new_session = np.empty(m_max, dtype=np.int64)
    new_session[0] = 0
    np.greater(np.diff(times[:m_max]), session_gap, out=new_session[1:], casting="unsafe")
    session_of = np.cumsum(new_session)  # [i] = index of the session holding item i
    if cap is None:
        return lambda m: np.where(m > 0, session_of[np.maximum(m - 1, 0)] + 1, 0)
    starts = np.concatenate(([0], np.flatnonzero(new_session))).astype(np.int64)
    done = np.concatenate(([0], np.cumsum(-(-np.diff(starts) // cap))))  # chunks of sessions before j

    def count(m: np.ndarray) -> np.ndarray:
        j = session_of[np.maximum(m - 1, 0)]  # the session holding item m-1; those before it are complete
        return np.where(m > 0, done[j] + (-(-(m - starts[j]) // cap)), 0)

    return count


def _to_segments(arrays: LayoutArrays) -> list[Segment]:
    """The readable form of a layout (tests and tools/inspect_patching.py; the data path uses the
    arrays): one Segment per segment."""
    return [Segment(KIND_NAMES[kind], tuple(range(start, end)))
            for kind, start, end in zip(arrays.kinds.tolist(), arrays.starts.tolist(), arrays.ends.tolist())]


def segments_to_arrays(segments: Sequence[Segment]) -> LayoutArrays:
    """The array form of a `Segment` list (assumes each segment's items are a contiguous range)."""
    kinds = np.fromiter((KIND_CODES[s.kind] for s in segments), dtype=np.int8, count=len(segments))
    starts = np.fromiter((s.items[0] for s in segments), dtype=np.int64, count=len(segments))
    ends = np.fromiter((s.items[-1] + 1 for s in segments), dtype=np.int64, count=len(segments))
    return LayoutArrays(kinds, starts, ends)


# ---------------------------------------------------------------------------------------------
# stages, array form


def text_arrays(n: int, max_text_items: int | None = None) -> LayoutArrays:
    """`layout_text` in array form."""
    _check_n(n)
    keep = n
    if max_text_items is not None:
        _check_int("max_text_items", max_text_items, 0)
        keep = min(n, max_text_items)
    return _assemble(_EMPTY_I64, _EMPTY_I64, n - keep, 0, n)


def pft_i_arrays(n: int, item_len: int) -> LayoutArrays:
    """`layout_pft_i` in array form."""
    _check_n(n)
    _check_int("item_len", item_len, 0)
    return _assemble(_EMPTY_I64, _EMPTY_I64, 0, max(0, n - item_len), n)


def pft_s_arrays(
    n: int,
    group_size: int,
    times: Sequence[float] | np.ndarray | None = None,
    session_gap: float | None = None,
    max_session_items: int | None = None,
) -> LayoutArrays:
    """`layout_pft_s` in array form."""
    _check_n(n)
    _check_int("group_size", group_size, 1)
    _check_sessions(session_gap, max_session_items)
    t = _times_array(times, n, session_gap)
    g = group_size
    m = max(0, n - 2 * g)
    n_item = max(0, n - g) - m
    if t is None:
        s_starts, s_ends = _fixed_chunks(m, g)
    else:
        s_starts, s_ends = _time_sessions(t, m, session_gap, max_session_items)  # type: ignore[arg-type]
    return _assemble(s_starts, s_ends, m, n_item, n)


def ppt_arrays(n: int, p: float, rng: np.random.Generator | None) -> LayoutArrays:
    """`layout_ppt` in array form."""
    _check_n(n)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"p must be in [0, 1]; got {p}")
    starts = np.arange(n, dtype=np.int64)
    if p == 0.0 or n == 0:
        kinds = np.full(n, TEXT, dtype=np.int8)
    elif p == 1.0:
        kinds = np.full(n, ITEM, dtype=np.int8)
    else:
        if rng is None:
            raise ValueError("ppt with 0 < p < 1 needs rng (see ppt_rng)")
        kinds = (rng.random(n) < p).astype(np.int8)  # ITEM == 1, TEXT == 0
    return LayoutArrays(kinds, starts, starts + 1)


def budget_arrays(
    n: int,
    title_lens: Sequence[int] | np.ndarray,
    max_positions: int,
    times: Sequence[float] | np.ndarray | None = None,
    session_gap: float | None = None,
    max_session_items: int | None = None,
    group_size: int = 5,
) -> LayoutArrays:
    """`layout_budget` in array form."""
    _check_n(n)
    _check_budget(max_positions)
    _check_int("group_size", group_size, 1)
    _check_sessions(session_gap, max_session_items)
    t = _times_array(times, n, session_gap)
    lens = _lens_array(title_lens, n)
    budget = int(max_positions)
    if n == 0:
        return _assemble(_EMPTY_I64, _EMPTY_I64, 0, 0, 0)
    cost = lens + 1  # a text item: its tokens and its separator
    # 1. everything as text
    if int(cost.sum()) <= budget:
        return _assemble(_EMPTY_I64, _EMPTY_I64, 0, 0, n)
    g = group_size
    text0 = min(g, n)
    item0 = min(g, n - text0)
    text_cost0 = int(cost[n - text0 :].sum())
    m0 = n - text0 - item0
    cap = max_session_items
    # 2. the PFT-S(g) shape at natural session granularity fits: spend the rest on text, then items
    if m0 == 0:
        natural0 = 0
    elif t is None:
        natural0 = -(-m0 // g)
    else:
        natural0 = _time_session_count(t, m0, session_gap, cap)  # type: ignore[arg-type]
    if text_cost0 + PATCH_COST * (item0 + natural0) <= budget:
        return _spend_slack(_budget_natural(n, cost, budget, g, t, session_gap, cap), cost, budget)
    # 3. sessions grow until they fit behind g text items and g item patches
    k = (budget - text_cost0 - PATCH_COST * item0) // PATCH_COST  # session patches affordable
    if m0 > 0 and k >= 1:
        return _spend_slack(_budget_grow(n, m0, item0, k, g, t, session_gap, cap), cost, budget)
    # 4. even one session does not fit there: most recent items as text as far as possible (at most
    #    g), then item patches, and one session patch for everything older
    return _spend_slack(_budget_tight(n, cost, budget, text0), cost, budget)


def _spend_slack(layout: LayoutArrays, cost: np.ndarray, budget: int) -> LayoutArrays:
    """Positions the steps above left unused, spent where they uncompress an item and compress
    none: the newest item patch becomes text when its title fits in what is left (a one-token
    title costs no more as text than as a patch), and the newest session gives up its newest item
    to the item patches (free for a one-item session, 2 positions otherwise). Repeated while one
    fits, so no layout that fits is less compressed everywhere (tests/test_layouts.py checks that
    by exhaustive search over small histories)."""
    kinds, starts, ends = layout
    n = int(ends[-1]) if ends.shape[0] else 0
    n_text, n_item = int((kinds == TEXT).sum()), int((kinds == ITEM).sum())
    s_starts, s_ends = starts[kinds == SESSION].tolist(), ends[kinds == SESSION].tolist()
    slack = budget - (int(cost[n - n_text :].sum()) + PATCH_COST * (n_item + len(s_starts)))
    changed = False
    while True:
        newest_item = n - n_text - 1
        if n_item and cost[newest_item] - PATCH_COST <= slack:
            slack -= int(cost[newest_item]) - PATCH_COST
            n_text, n_item = n_text + 1, n_item - 1
        elif s_starts and (s_ends[-1] - s_starts[-1] == 1 or slack >= PATCH_COST):
            if s_ends[-1] - s_starts[-1] == 1:
                s_starts.pop(), s_ends.pop()
            else:
                s_ends[-1] -= 1
                slack -= PATCH_COST
            n_item += 1
        else:
            break
        changed = True
    if not changed:
        return layout
    return _assemble(np.asarray(s_starts, np.int64), np.asarray(s_ends, np.int64), n - n_text - n_item, n_item, n)


def _budget_natural(
    n: int, cost: np.ndarray, budget: int, g: int, t: np.ndarray | None, gap: float | None, cap: int | None
) -> LayoutArrays:
    """Largest text suffix, then most item patches (at least g), natural sessions for the rest."""
    # A text item costs >= 1 position, so at most `budget` items can be text: look no further back.
    window = min(n, budget)
    text_suffix = np.zeros(window + 1, dtype=np.int64)  # [T] = cost of the last T items as text
    np.cumsum(cost[n - window :][::-1], out=text_suffix[1:])
    window = int(np.searchsorted(text_suffix, budget, side="right")) - 1  # text alone must fit
    count = _prefix_session_counter(n, g, t, gap, cap)
    n_text = np.arange(window + 1)
    n_item = np.minimum(g, n - n_text)
    fed = text_suffix[: window + 1] + PATCH_COST * (n_item + count(n - n_text - n_item))
    n_text_best = int(np.flatnonzero(fed <= budget)[-1])
    rest = n - n_text_best
    room = budget - int(text_suffix[n_text_best])
    items = np.arange(min(g, rest), max(min(g, rest), min(rest, room // PATCH_COST)) + 1)
    fed_i = PATCH_COST * (items + count(rest - items))
    n_item_best = int(items[np.flatnonzero(fed_i <= room)[-1]])
    m = rest - n_item_best
    if t is None:
        s_starts, s_ends = _fixed_chunks(m, g)
    else:
        s_starts, s_ends = _time_sessions(t, m, gap, cap)  # type: ignore[arg-type]
    return _assemble(s_starts, s_ends, m, n_item_best, n)


def _budget_grow(
    n: int, m: int, n_item: int, k: int, g: int, t: np.ndarray | None, gap: float | None, cap: int | None
) -> LayoutArrays:
    """At most k session patches for [0, m): the finest sessions that fit, then slack to item patches."""
    size = -(-m // k)  # fixed-size sessions, when there are no usable time-gap sessions
    bounds = None if t is None else _merged_boundaries(t, m, k, gap, cap)  # type: ignore[arg-type]

    def count(m_: int) -> int:
        if bounds is None:
            return -(-m_ // size)
        return _edges_count(_prefix_edges(bounds, m_), cap)

    # Unused session patches become item patches for the most recent session members: the most j
    # with j + count(m - j) <= k. Taking one item off the session part removes at most one session,
    # so j + count(m - j) never decreases in j: bisect.
    lo, hi = 0, m  # j = lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid + count(m - mid) <= k:
            lo = mid
        else:
            hi = mid - 1
    m -= lo
    n_item += lo
    if bounds is None:
        s_starts, s_ends = _fixed_chunks(m, size)
    elif m == 0:
        s_starts, s_ends = _EMPTY_I64, _EMPTY_I64
    else:
        edges = _prefix_edges(bounds, m)
        s_starts, s_ends = edges[:-1], edges[1:]
        if cap is not None:
            s_starts, s_ends = _split_from_end(s_starts, s_ends, cap)
    return _assemble(s_starts, s_ends, m, n_item, n)


def _prefix_edges(bounds: np.ndarray, m: int) -> np.ndarray:
    """Session edges of the prefix [0, m) given sorted session starts `bounds` (positions >= 1)."""
    inner = bounds[: int(np.searchsorted(bounds, m, side="left"))]
    return np.concatenate(([0], inner, [m])).astype(np.int64, copy=False)


def _edges_count(edges: np.ndarray, cap: int | None) -> int:
    if edges[-1] == 0:
        return 0
    if cap is None:
        return int(edges.shape[0]) - 1
    return int((-(-np.diff(edges) // cap)).sum())


def _merged_boundaries(t: np.ndarray, m: int, k: int, gap: float, cap: int | None) -> np.ndarray | None:
    """Session starts for [0, m) giving at most k time-gap sessions (after cap splits), or None.

    Sessions are merged across their smallest time gaps first: the largest gaps stay boundaries.
    Without a cap that is the k-1 largest gaps. With a cap, splitting can only add sessions, so the
    count shrinks as the smallest kept gap grows: bisect over the sorted gaps. None when the cap itself cannot fit
    (ceil(m / cap) > k): then sessions must outgrow the cap, and fixed sizes are used.
    """
    d = np.diff(t[:m])
    natural = np.flatnonzero(d > gap)
    bounds = natural + 1
    if _edges_count(_prefix_edges(bounds, m), cap) <= k:
        return bounds
    gaps = d[natural]
    total = gaps.shape[0]
    if cap is None:
        keep = k - 1  # >= 0 and < total here
        if keep == 0:
            return bounds[:0]
        return bounds[np.sort(np.argpartition(gaps, total - keep)[total - keep :])]
    if -(-m // cap) > k:
        return None
    ordered = np.sort(gaps)

    def fits(i: int) -> bool:  # keep the gaps larger than the i-th smallest one
        return _edges_count(_prefix_edges(bounds[gaps > ordered[i]], m), cap) <= k

    lo, hi = 0, total - 1  # smallest fitting i lies in [lo, hi]; i = total - 1 keeps no gap, so fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return bounds[gaps > ordered[lo]]


def _budget_tight(n: int, cost: np.ndarray, budget: int, max_text: int) -> LayoutArrays:
    """Lexicographic from the recent end: text (at most max_text items), item patches, one session."""
    text_suffix = np.concatenate(([0], np.cumsum(cost[n - max_text :][::-1])))
    n_text = np.arange(max_text + 1)
    fed = text_suffix + PATCH_COST * (n_text < n)
    n_text_best = int(np.flatnonzero(fed <= budget)[-1])
    rest = n - n_text_best
    room = budget - int(text_suffix[n_text_best])
    n_item = rest if PATCH_COST * rest <= room else (room - PATCH_COST) // PATCH_COST
    m = rest - n_item
    s_starts, s_ends = (np.zeros(1, np.int64), np.full(1, m, np.int64)) if m else (_EMPTY_I64, _EMPTY_I64)
    return _assemble(s_starts, s_ends, m, n_item, n)


def layout_arrays(
    spec: LayoutSpec,
    n: int,
    title_lens: Sequence[int] | np.ndarray | None = None,
    times: Sequence[float] | np.ndarray | None = None,
    p: float = 0.0,
    rng: np.random.Generator | None = None,
) -> LayoutArrays:
    """`make_layout` in array form: the fast path for data pipelines."""
    stage = spec.stage
    if stage == "text":
        return text_arrays(n, spec.max_text_items)
    if stage == "pft-i":
        return pft_i_arrays(n, spec.item_len)
    if stage == "pft-s":
        return pft_s_arrays(n, spec.group_size, times, spec.session_gap, spec.max_session_items)
    if stage == "ppt":
        return ppt_arrays(n, p, rng)
    if title_lens is None:
        raise ValueError("stage 'budget' needs title_lens (tokens per history title)")
    return budget_arrays(
        n, title_lens, spec.max_positions, times, spec.session_gap, spec.max_session_items, spec.group_size  # type: ignore[arg-type]
    )


def positions_fed_arrays(arrays: LayoutArrays, title_lens: Sequence[int] | np.ndarray) -> int:
    """`positions_fed` for the array form."""
    kinds, starts = arrays.kinds, arrays.starts
    if kinds.shape[0] == 0:
        return 0
    is_text = kinds == TEXT
    lens = np.asarray(title_lens)
    text_tokens = int(lens[starts[is_text]].sum()) if is_text.any() else 0
    return text_tokens + int(is_text.sum()) + PATCH_COST * int((~is_text).sum())


# ---------------------------------------------------------------------------------------------
# stages, readable form: a view of the array form above, for tests and tools/inspect_patching.py


def layout_text(n: int, max_text_items: int | None = None) -> list[Segment]:
    """Every item as text; with `max_text_items`, only the most recent K (older ones are dropped)."""
    return _to_segments(text_arrays(n, max_text_items))


def layout_pft_i(n: int, item_len: int) -> list[Segment]:
    """PFT-I: the last `item_len` items as text, every older one an item patch."""
    return _to_segments(pft_i_arrays(n, item_len))


def layout_pft_s(
    n: int,
    group_size: int,
    times: Sequence[float] | np.ndarray | None = None,
    session_gap: float | None = None,
    max_session_items: int | None = None,
) -> list[Segment]:
    """PFT-S: the last g items as text, the g before them item patches, older ones session patches.

    Sessions hold g items aligned from the recent end, so the oldest one is the partial one. With
    `session_gap` (seconds; needs `times`), the sessions are instead the runs of items without a
    gap larger than `session_gap`, each split into chunks of `max_session_items` (aligned from its
    recent end) when longer.
    """
    return _to_segments(pft_s_arrays(n, group_size, times, session_gap, max_session_items))


def layout_ppt(n: int, p: float, rng: np.random.Generator | None) -> list[Segment]:
    """PPT: each item independently an item patch with probability p, else text.

    `rng` should come from `ppt_rng` so that a resumed run draws the same layouts. It may be None
    when p is 0 or 1 (nothing is drawn then).
    """
    return _to_segments(ppt_arrays(n, p, rng))


def layout_budget(
    n: int,
    title_lens: Sequence[int] | np.ndarray,
    max_positions: int,
    times: Sequence[float] | np.ndarray | None = None,
    session_gap: float | None = None,
    max_session_items: int | None = None,
    group_size: int = 5,
) -> list[Segment]:
    """The least compression of the history that fits in `max_positions` history positions.

    Always ``positions_fed(layout, title_lens) <= max_positions`` for any n, provided
    ``max_positions >= MIN_BUDGET_POSITIONS`` (2: the whole history as one session patch and its
    separator; below it, ValueError). Layouts are monotone: text is a suffix of the history,
    session patches a prefix, item patches in between, so no item is compressed more than an
    older one. Pass `title_lens` as an int numpy array for speed.

    Compression is added in this order as the budget shrinks, starting from the PFT-S(g) shape
    (g text items, g item patches, "natural" sessions: g items each, or time-gap sessions when
    `session_gap` is given, split at `max_session_items`):

    1. all text, when it fits;
    2. if the PFT-S(g) shape fits: the longest text suffix, then the most item patches (at least
       g) such that the older items still fit as natural sessions;
    3. else, g text and g item patches; sessions grow just enough (fixed sizes aligned from the
       recent end, or time-gap sessions merged across their smallest gaps, max_session_items kept
       while it can be, then fixed sizes); unused session positions become item patches;
    4. else (not even one session fits behind them): the longest text suffix of at most g items,
       then item patches, then one session patch for everything older;
    5. after any of 2-4, positions left over uncompress the newest compressed items while they
       fit (an item patch whose title fits becomes text; the newest session gives its newest item
       to the item patches), so no layout that fits is less compressed everywhere.

    Why not simply "as much text as fits, then item patches, then one session": that collapses
    the whole older history into a single session patch as soon as the history is long, and
    time-gap sessions would never survive; here older items keep session-level detail and the
    budget is traded against it only when the PFT-S shape no longer fits.
    """
    return _to_segments(budget_arrays(n, title_lens, max_positions, times, session_gap, max_session_items, group_size))


def make_layout(
    spec: LayoutSpec,
    n: int,
    title_lens: Sequence[int] | np.ndarray | None = None,
    times: Sequence[float] | np.ndarray | None = None,
    p: float = 0.0,
    rng: np.random.Generator | None = None,
) -> list[Segment]:
    """The layout of an n-item history for `spec`'s stage.

    budget needs `title_lens`; time-gap sessions need `times`; ppt uses `p` (see `ppt_probability`)
    and `rng` (see `ppt_rng`).
    """
    return _to_segments(layout_arrays(spec, n, title_lens, times, p, rng))


def positions_fed(segments: Sequence[Segment], title_lens: Sequence[int] | np.ndarray) -> int:
    """History positions the prompt spends: per segment, (title tokens if text else 1) + 1 separator."""
    total = 0
    for seg in segments:
        total += (int(title_lens[seg.items[0]]) + 1) if seg.kind == "text" else PATCH_COST
    return total


# ---------------------------------------------------------------------------------------------
# PPT schedule and randomness


def ppt_probability(step: int, total_steps: int, schedule: str = "linear", p_max: float = 1.0) -> float:
    """Probability that PPT compresses an item at `step` of `total_steps`.

    The paper's curriculum: p grows with training progress (step / total_steps), from all-text to
    mostly patched. The released code divides by ``args.max_steps``, which is -1 unless set, so
    p <= 0 and nothing is ever compressed; hence the explicit error for total_steps <= 0.
    Schedules: "linear" (p_max * progress), "cosine" (half-cosine from 0 to p_max), "constant"
    (p_max). The result is clamped to [0, p_max].
    """
    if total_steps <= 0:
        raise ValueError(
            f"total_steps must be > 0 to compute the PPT probability; got {total_steps} "
            "(the released code's max_steps=-1 made p <= 0 and never compressed anything)"
        )
    if not (0.0 <= p_max <= 1.0):
        raise ValueError(f"p_max must be in [0, 1]; got {p_max}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        p = p_max * progress
    elif schedule == "cosine":
        p = p_max * 0.5 * (1.0 - math.cos(math.pi * progress))
    elif schedule == "constant":
        p = p_max
    else:
        raise ValueError(f"schedule must be one of {', '.join(PPT_SCHEDULES)}; got {schedule!r}")
    return min(max(p, 0.0), p_max)


def ppt_rng(seed: int, epoch: int, example_key: int) -> np.random.Generator:
    """A generator for one example's PPT draws, from (seed, epoch, example_key) only.

    Seeding per example (not per worker stream) makes the layout independent of worker count,
    shuffling and where a run resumed: the same example in the same epoch gets the same layout.
    All three must be non-negative integers (e.g. the example's index in the data set).
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("example_key", example_key)):
        _check_int(name, value, 0)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence((int(seed), int(epoch), int(example_key)))))
