"""Layouts of a history into text / item-patch / session-patch segments (patchrec_dist.patching.layouts).

The rules are docs/reference.md's "Stages and their layouts"; the worked examples are checked verbatim.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchrec_dist.patching import layouts as L
from patchrec_dist.patching.layouts import (
    MIN_BUDGET_POSITIONS,
    PATCH_COST,
    LayoutSpec,
    Segment,
    layout_arrays,
    layout_budget,
    layout_pft_i,
    layout_pft_s,
    layout_ppt,
    layout_text,
    make_layout,
    positions_fed,
    positions_fed_arrays,
    ppt_probability,
    ppt_rng,
    segments_to_arrays,
)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "inspect_patching.py"
RANK = {"session": 0, "item": 1, "text": 2}


def S(*items: int) -> Segment:
    return Segment("session", tuple(items))


def I(i: int) -> Segment:  # noqa: E743 - reads like the reference's notation
    return Segment("item", (i,))


def T(i: int) -> Segment:
    return Segment("text", (i,))


def compact(segments: list[Segment]) -> list[tuple[str, int, int]]:
    """(kind, first, last) per segment: short, and exact for contiguous segments."""
    return [(s.kind, s.items[0], s.items[-1]) for s in segments]


def reference_pft_s(n: int, g: int) -> list[Segment]:
    """A deliberately naive restatement of reference.md's PFT-S rule, item by item from the recent end."""
    kinds: dict[int, str] = {}
    for back, pos in enumerate(range(n - 1, -1, -1)):
        kinds[pos] = "text" if back < g else "item" if back < 2 * g else "session"
    out: list[Segment] = []
    sessions_end = max(0, n - 2 * g)
    bounds = list(range(sessions_end, 0, -g))[::-1]  # recent-end-aligned session ends
    start = 0
    for end in bounds:
        out.append(Segment("session", tuple(range(start, end))))
        start = end
    out += [Segment(kinds[i], (i,)) for i in range(sessions_end, n)]
    return out


def check_partition(segments: list[Segment], n: int) -> None:
    """Every position exactly once, in order; kinds ordered sessions < items < text; singles are single."""
    flat = [i for s in segments for i in s.items]
    assert flat == list(range(n))
    ranks = [RANK[s.kind] for s in segments]
    assert ranks == sorted(ranks)
    assert all(len(s.items) == 1 for s in segments if s.kind != "session")
    assert all(len(s.items) >= 1 for s in segments)


def kinds_per_item(segments: list[Segment], n: int) -> list[str]:
    out = [""] * n
    for s in segments:
        for i in s.items:
            out[i] = s.kind
    return out


# ---------------------------------------------------------------------------------------------
# reference.md worked examples


def test_pft_s_worked_examples():
    g = 5
    assert layout_pft_s(23, g) == [S(0, 1, 2), S(3, 4, 5, 6, 7), S(8, 9, 10, 11, 12)] + [I(i) for i in range(13, 18)] + [
        T(i) for i in range(18, 23)
    ]
    assert layout_pft_s(20, g) == [S(0, 1, 2, 3, 4), S(5, 6, 7, 8, 9)] + [I(i) for i in range(10, 15)] + [
        T(i) for i in range(15, 20)
    ]
    assert layout_pft_s(11, g) == [S(0)] + [I(i) for i in range(1, 6)] + [T(i) for i in range(6, 11)]
    assert layout_pft_s(9, g) == [I(i) for i in range(0, 4)] + [T(i) for i in range(4, 9)]
    for n in range(0, 6):
        assert layout_pft_s(n, g) == [T(i) for i in range(n)]
    assert layout_pft_s(0, g) == []


def test_pft_s_worked_examples_through_every_entry_point():
    expected = layout_pft_s(23, 5)
    assert make_layout(LayoutSpec("pft-s", group_size=5), 23) == expected
    arrays = layout_arrays(LayoutSpec("pft-s", group_size=5), 23)
    assert arrays.kinds.tolist() == [L.SESSION] * 3 + [L.ITEM] * 5 + [L.TEXT] * 5
    assert arrays.starts.tolist()[:4] == [0, 3, 8, 13] and arrays.ends.tolist()[:4] == [3, 8, 13, 14]
    assert segments_to_arrays(expected).starts.tolist() == arrays.starts.tolist()


def test_pft_i_examples():
    assert layout_pft_i(12, 5) == [I(i) for i in range(7)] + [T(i) for i in range(7, 12)]
    assert layout_pft_i(5, 5) == [T(i) for i in range(5)]
    assert layout_pft_i(3, 5) == [T(i) for i in range(3)]
    assert layout_pft_i(4, 0) == [I(i) for i in range(4)]
    assert layout_pft_i(0, 5) == []


def test_text_stage_and_truncation():
    assert layout_text(4) == [T(0), T(1), T(2), T(3)]
    assert layout_text(10, max_text_items=3) == [T(7), T(8), T(9)]  # older items dropped entirely
    assert layout_text(2, max_text_items=3) == [T(0), T(1)]
    assert layout_text(0) == [] and layout_text(0, 3) == []
    assert make_layout(LayoutSpec("text", max_text_items=2), 5) == [T(3), T(4)]


def test_positions_fed_counts_tokens_or_one_plus_a_separator():
    lens = [3] * 23
    segs = layout_pft_s(23, 5)
    assert positions_fed(segs, lens) == 3 * 2 + 5 * 2 + 5 * (3 + 1)
    lens = list(range(1, 24))
    assert positions_fed(segs, lens) == 16 + sum(lens[i] + 1 for i in range(18, 23))
    assert positions_fed_arrays(segments_to_arrays(segs), lens) == positions_fed(segs, lens)
    assert positions_fed([], []) == 0


# ---------------------------------------------------------------------------------------------
# the rules for every n in 0..300 and parameter in 1..25


def test_pft_s_rules_exhaustive():
    for g in range(1, 26):
        for n in range(0, 301):
            segs = layout_pft_s(n, g)
            check_partition(segs, n)
            kinds = [s.kind for s in segs]
            assert kinds.count("text") == min(n, g)
            assert kinds.count("item") == min(g, max(0, n - g))
            sizes = [len(s.items) for s in segs if s.kind == "session"]
            assert sum(sizes) == max(0, n - 2 * g)
            if sizes:
                assert all(size == g for size in sizes[1:]), (n, g, sizes)
                assert 1 <= sizes[0] <= g
            assert segs == reference_pft_s(n, g), (n, g)


def test_pft_s_array_form_matches_the_list_form():
    for g in (1, 2, 5, 20):
        for n in range(0, 120, 7):
            arrays = L.pft_s_arrays(n, g)
            assert L._to_segments(arrays) == layout_pft_s(n, g)
            assert segments_to_arrays(layout_pft_s(n, g)).ends.tolist() == arrays.ends.tolist()


def test_pft_i_rules_exhaustive():
    for k in range(1, 26):
        for n in range(0, 301):
            segs = layout_pft_i(n, k)
            check_partition(segs, n)
            kinds = [s.kind for s in segs]
            assert kinds.count("session") == 0
            assert kinds.count("text") == min(n, k)
            assert kinds.count("item") == max(0, n - k)


# ---------------------------------------------------------------------------------------------
# time-gap sessions


def times_with_gaps(n: int, gaps_after: dict[int, float], step: float = 10.0) -> np.ndarray:
    """Timestamps `step` apart, with gaps_after[i] seconds between item i and i+1 instead."""
    deltas = np.full(n, step)
    deltas[0] = 0.0
    for i, gap in gaps_after.items():
        deltas[i + 1] = gap
    return np.cumsum(deltas) + 1_700_000_000.0


def test_pft_s_time_gap_sessions():
    n, g = 30, 5  # the last 10 items are items/text, sessions come from positions 0..19
    times = times_with_gaps(n, {2: 4000.0, 9: 5000.0, 10: 3601.0, 21: 9999.0})
    segs = layout_pft_s(n, g, times=times, session_gap=3600.0)
    assert compact(segs)[:4] == [("session", 0, 2), ("session", 3, 9), ("session", 10, 10), ("session", 11, 19)]
    # the gap after item 21 is inside the item/text part: it does not matter there
    assert [s.kind for s in segs[4:]] == ["item"] * 5 + ["text"] * 5
    check_partition(segs, n)


def test_time_gap_equal_to_threshold_does_not_split():
    times = times_with_gaps(20, {4: 3600.0})
    segs = layout_pft_s(20, 5, times=times, session_gap=3600.0)
    assert compact(segs)[0] == ("session", 0, 9)


def test_time_gap_sessions_split_from_their_recent_end():
    n, g = 30, 5
    times = times_with_gaps(n, {2: 4000.0, 9: 5000.0, 10: 3601.0})
    segs = layout_pft_s(n, g, times=times, session_gap=3600.0, max_session_items=3)
    assert compact(segs)[:8] == [
        ("session", 0, 2),
        ("session", 3, 3),  # [3-9] has 7 items: 1 + 3 + 3, partial chunk oldest
        ("session", 4, 6),
        ("session", 7, 9),
        ("session", 10, 10),
        ("session", 11, 13),  # [11-19] has 9 items: 3 + 3 + 3
        ("session", 14, 16),
        ("session", 17, 19),
    ]


def test_time_gap_needs_times_and_matching_length():
    with pytest.raises(ValueError, match="times"):
        layout_pft_s(30, 5, session_gap=60.0)
    with pytest.raises(ValueError, match="times"):
        layout_pft_s(30, 5, times=np.arange(29.0), session_gap=60.0)
    with pytest.raises(ValueError, match="session_gap"):
        layout_pft_s(30, 5, max_session_items=4)  # a cap without time-gap sessions is a config slip
    with pytest.raises(ValueError, match="times"):
        make_layout(LayoutSpec("pft-s", session_gap=60.0), 30)


def test_budget_keeps_time_gap_sessions_when_they_fit_and_merges_smallest_gaps_first():
    n, g = 60, 5
    gaps = {9: 4000.0, 19: 90000.0, 29: 5000.0, 39: 70000.0}  # sessions [0-9] [10-19] [20-29] [30-39] [40-49]
    times = times_with_gaps(n, gaps)
    lens = np.full(n, 4)
    natural = positions_fed(layout_pft_s(n, g, times=times, session_gap=3600.0), lens)
    expected = [
        [(0, 9), (10, 19), (20, 29), (30, 39), (40, 49)],  # room for the natural sessions: kept
        [(0, 19), (20, 29), (30, 39), (40, 49)],  # one patch fewer: the 4000 s gap goes first
        [(0, 19), (20, 39), (40, 49)],  # then the 5000 s gap
        [(0, 19), (20, 49)],  # then 70000 s
        [(0, 49)],
    ]
    for fewer, sessions in enumerate(expected):
        budget = natural - PATCH_COST * fewer
        segs = layout_budget(n, lens, budget, times=times, session_gap=3600.0, group_size=g)
        assert [(s.items[0], s.items[-1]) for s in segs if s.kind == "session"] == sessions
        assert [s.kind for s in segs if s.kind != "session"] == ["item"] * 5 + ["text"] * 5
        assert positions_fed(segs, lens) == budget


# ---------------------------------------------------------------------------------------------
# budget


def check_budget_layout(segs: list[Segment], n: int, lens: np.ndarray, budget: int) -> None:
    check_partition(segs, n)
    fed = positions_fed(segs, lens)
    assert fed <= budget, (n, budget, fed)
    kinds = kinds_per_item(segs, n)
    # monotone: text is a suffix, session members a prefix
    for i in range(n - 1):
        if kinds[i] == "text":
            assert kinds[i + 1] == "text"
        if kinds[i + 1] == "session":
            assert kinds[i] == "session"
    all_text = int(lens.sum()) + n
    if all_text <= budget:
        assert all(k == "text" for k in kinds)


def ref_natural_sessions(m: int, g: int, times=None, gap=None, cap=None) -> list[tuple[int, int]]:
    """Natural sessions of [0, m) as (first, last), restated naively: g-sized from the recent end, or time gaps."""
    if m == 0:
        return []
    if gap is None:
        ends = list(range(m, 0, -g))[::-1]
        return [(max(0, e - g), e - 1) for e in ends]
    out, start = [], 0
    for i in range(1, m + 1):
        if i == m or times[i] - times[i - 1] > gap:
            run = list(range(start, i))
            chunks = []
            while run:  # peel chunks of `cap` off the recent end
                take = len(run) if cap is None else min(cap, len(run))
                chunks.insert(0, (run[-take], run[-1]))
                run = run[:-take]
            out += chunks
            start = i
    return out


def monotone_layouts(n: int):
    """Every monotone layout of n items as (text items, item patches, sessions as (first, last)):
    a text suffix, item patches before it, and each way to cut the rest into consecutive sessions."""
    for n_text in range(n + 1):
        for n_item in range(n - n_text + 1):
            m = n - n_text - n_item
            for cuts in itertools.product((False, True), repeat=max(0, m - 1)):
                sessions, start = [], 0
                for i, cut in enumerate(cuts, start=1):
                    if cut:
                        sessions.append((start, i - 1))
                        start = i
                yield n_text, n_item, sessions + ([(start, m - 1)] if m else [])


def compression(n: int, n_text: int, n_item: int, sessions) -> tuple[list[int], list]:
    """Per item: 0 text, 1 item patch, 2 in a session; and the session each session item is in."""
    level = [2] * (n - n_text - n_item) + [1] * n_item + [0] * n_text
    session_of = [None] * n
    for first, last in sessions:
        for i in range(first, last + 1):
            session_of[i] = (first, last)
    return level, session_of


def less_compressed(a, b) -> bool:
    """A compresses no item more than B (its sessions nest inside B's), and some item less."""
    (la, sa), (lb, sb) = a, b
    if any(x > y for x, y in zip(la, lb)):
        return False
    nested = all(sa[i][0] >= sb[i][0] and sa[i][1] <= sb[i][1] for i in range(len(la)) if la[i] == lb[i] == 2)
    return nested and (la, sa) != (lb, sb)


def test_budget_is_the_least_compression_that_fits_by_exhaustive_search():
    """No layout that fits the budget compresses every item at most as much as layout_budget's and
    some item less: checked against every monotone layout of histories up to 8 items, every budget,
    fixed and time-gap sessions (one-token titles included: there text costs what a patch costs)."""
    rng = np.random.default_rng(0)
    for n in range(1, 9):
        all_layouts = [(L, 2 * (L[1] + len(L[2]))) for L in monotone_layouts(n)]
        for g in (1, 2, 3, 5):
            lens = rng.integers(1, 5, n)
            times = np.cumsum(rng.integers(0, 4, n)).astype(float)
            text_cost = np.concatenate(([0], np.cumsum((lens + 1)[::-1])))  # [t]: the last t items as text
            for kwargs in ({}, {"session_gap": 2.0}, {"session_gap": 1.0, "max_session_items": 2}):
                for budget in range(MIN_BUDGET_POSITIONS, int(lens.sum()) + n + 2):
                    segs = layout_budget(n, lens, budget, times=times if kwargs else None, group_size=g, **kwargs)
                    check_budget_layout(segs, n, lens, budget)
                    got = compression(n, sum(s.kind == "text" for s in segs), sum(s.kind == "item" for s in segs),
                                      [(s.items[0], s.items[-1]) for s in segs if s.kind == "session"])
                    for (n_text, n_item, sessions), patches in all_layouts:
                        if text_cost[n_text] + patches <= budget:
                            assert not less_compressed(compression(n, n_text, n_item, sessions), got), \
                                (n, g, lens.tolist(), budget, kwargs, compact(segs), (n_text, n_item, sessions))


def test_budget_fits_every_budget_and_is_monotone():
    rng = np.random.default_rng(1234)
    kinds: set[str] = set()
    for trial in range(400):
        n = int(rng.choice([rng.integers(0, 60), rng.integers(60, 600), rng.integers(600, 10_001)]))
        lens = rng.integers(1, 31, n)
        all_text = int(lens.sum()) + n
        upper = max(MIN_BUDGET_POSITIONS + 1, min(all_text + 20, 3 * n + 200) if trial % 2 else all_text + 20)
        budget = int(rng.integers(MIN_BUDGET_POSITIONS, upper))
        g = int(rng.integers(1, 26))
        segs = layout_budget(n, lens, budget, group_size=g)
        check_budget_layout(segs, n, lens, budget)
        kinds |= {seg.kind for seg in segs}
        if trial % 4 == 0:
            times = np.cumsum(rng.exponential(3600.0, n))
            cap = [None, 1, 4, 50][trial // 4 % 4]
            segs = layout_budget(n, lens, budget, times=times, session_gap=3600.0, max_session_items=cap, group_size=g)
            check_budget_layout(segs, n, lens, budget)
    assert kinds == {"text", "item", "session"}  # the budgets drawn reached every kind of compression


def test_budget_every_small_budget_exhaustively():
    rng = np.random.default_rng(7)
    for n in (1, 2, 7, 11, 23, 64):
        lens = rng.integers(1, 31, n)
        times = np.cumsum(rng.exponential(60.0, n))
        for budget in range(MIN_BUDGET_POSITIONS, int(lens.sum()) + n + 3):
            check_budget_layout(layout_budget(n, lens, budget), n, lens, budget)
            segs = layout_budget(n, lens, budget, times=times, session_gap=60.0, max_session_items=3, group_size=3)
            check_budget_layout(segs, n, lens, budget)


def test_budget_all_text_exactly_when_it_fits():
    lens = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    all_text = int(lens.sum()) + len(lens)
    assert layout_budget(8, lens, all_text) == layout_text(8)
    assert layout_budget(8, lens, all_text + 100) == layout_text(8)
    assert layout_budget(8, lens, all_text - 1) != layout_text(8)


def test_budget_ten_thousand_items_fit_even_the_minimum():
    n = 10_000
    lens = np.full(n, 12)
    segs = layout_budget(n, lens, MIN_BUDGET_POSITIONS)
    assert segs == [Segment("session", tuple(range(n)))]
    for budget in (3, 10, 57, 500, 4_000, 40_000, 129_999, 130_000):
        check_budget_layout(layout_budget(n, lens, budget), n, lens, budget)


def test_budget_prefers_text_for_the_most_recent_items():
    n, g = 200, 5
    lens = np.full(n, 9)
    pft_s_cost = positions_fed(layout_pft_s(n, g), lens)
    # from the PFT-S(5) cost upward the g most recent items stay text and more text is added with room
    texts = []
    for budget in range(pft_s_cost, pft_s_cost + 200, 10):
        segs = layout_budget(n, lens, budget, group_size=g)
        texts.append(sum(s.kind == "text" for s in segs))
        assert texts[-1] >= g
    assert texts == sorted(texts) and texts[-1] > g
    # far below it: sessions grow, the g text items and g item patches stay
    segs = layout_budget(n, lens, 80, group_size=g)
    kinds = [s.kind for s in segs]
    assert kinds.count("text") == g and kinds.count("item") >= g
    assert max(len(s.items) for s in segs if s.kind == "session") > g


def test_budget_minimum_is_enforced_with_a_named_error():
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="max_positions"):
            layout_budget(10, [1] * 10, bad)
        with pytest.raises(ValueError, match="max_positions"):
            LayoutSpec("budget", max_positions=bad)
    with pytest.raises(ValueError, match="max_positions"):
        LayoutSpec("budget")
    with pytest.raises(ValueError, match="title_lens"):
        make_layout(LayoutSpec("budget", max_positions=50), 10)
    with pytest.raises(ValueError, match="title_lens"):
        layout_budget(10, [1] * 9, 50)
    assert layout_budget(0, [], MIN_BUDGET_POSITIONS) == []


# ---------------------------------------------------------------------------------------------
# PPT


def test_ppt_extremes_and_determinism():
    n = 500
    assert layout_ppt(n, 0.0, ppt_rng(0, 0, 1)) == layout_text(n)
    assert layout_ppt(n, 1.0, ppt_rng(0, 0, 1)) == [I(i) for i in range(n)]
    a = layout_ppt(n, 0.5, ppt_rng(42, 3, 17))
    b = layout_ppt(n, 0.5, ppt_rng(42, 3, 17))
    assert a == b
    assert a != layout_ppt(n, 0.5, ppt_rng(42, 3, 18))  # another example
    assert a != layout_ppt(n, 0.5, ppt_rng(42, 4, 17))  # another epoch
    check_partition_any_order(a, n)
    share = sum(s.kind == "item" for s in layout_ppt(20_000, 0.3, ppt_rng(1, 0, 0))) / 20_000
    assert abs(share - 0.3) < 0.02
    spec = LayoutSpec("ppt")
    assert make_layout(spec, 50, p=0.5, rng=ppt_rng(42, 3, 17)) == layout_ppt(50, 0.5, ppt_rng(42, 3, 17))
    with pytest.raises(ValueError, match="rng"):
        layout_ppt(10, 0.5, None)
    with pytest.raises(ValueError, match="p must be"):
        layout_ppt(10, 1.5, ppt_rng(0, 0, 0))
    with pytest.raises(ValueError, match="example_key"):
        ppt_rng(0, 0, -1)


def check_partition_any_order(segments: list[Segment], n: int) -> None:
    assert [i for s in segments for i in s.items] == list(range(n))
    assert all(len(s.items) == 1 and s.kind in ("text", "item") for s in segments)


def test_ppt_probability_schedules():
    assert ppt_probability(0, 100) == 0.0
    assert ppt_probability(50, 100) == pytest.approx(0.5)
    assert ppt_probability(100, 100) == 1.0
    assert ppt_probability(150, 100) == 1.0  # clamped
    assert ppt_probability(-3, 100) == 0.0
    assert ppt_probability(50, 100, p_max=0.6) == pytest.approx(0.3)
    assert ppt_probability(100, 100, p_max=0.6) == pytest.approx(0.6)
    assert ppt_probability(0, 100, "constant", 0.7) == 0.7
    assert ppt_probability(99, 100, "constant", 0.7) == 0.7
    assert ppt_probability(0, 100, "cosine") == 0.0
    assert ppt_probability(50, 100, "cosine") == pytest.approx(0.5)
    assert ppt_probability(25, 100, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert ppt_probability(100, 100, "cosine", 0.8) == pytest.approx(0.8)
    ps = [ppt_probability(s, 1000) for s in range(0, 1001, 50)]
    assert ps == sorted(ps) and ps[0] < ps[-1]  # grows with progress (the released code's p stayed <= 0)
    for bad_total in (0, -1):
        with pytest.raises(ValueError, match="total_steps"):
            ppt_probability(10, bad_total)
    with pytest.raises(ValueError, match="schedule"):
        ppt_probability(1, 10, "exponential")


# ---------------------------------------------------------------------------------------------
# dispatch, validation, array form


def test_layout_spec_validation():
    with pytest.raises(ValueError, match="group_size"):
        LayoutSpec("pft-s", group_size=0)
    with pytest.raises(ValueError, match="stage"):
        LayoutSpec("pft-x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="item_len"):
        LayoutSpec("pft-i", item_len=-1)
    with pytest.raises(ValueError, match="n must"):
        layout_pft_s(-1, 5)
    with pytest.raises(ValueError, match="group_size"):
        layout_pft_s(10, 0)


def test_array_form_matches_list_form_for_every_stage():
    rng = np.random.default_rng(5)
    n = 137
    lens = rng.integers(1, 20, n)
    times = np.cumsum(rng.exponential(100.0, n))
    specs = [
        LayoutSpec("text"),
        LayoutSpec("text", max_text_items=20),
        LayoutSpec("pft-i", item_len=7),
        LayoutSpec("pft-s", group_size=6),
        LayoutSpec("pft-s", group_size=6, session_gap=100.0, max_session_items=4),
        LayoutSpec("budget", max_positions=90),
        LayoutSpec("budget", max_positions=300, session_gap=100.0),
        LayoutSpec("ppt"),
    ]
    for spec in specs:
        segs = make_layout(spec, n, title_lens=lens, times=times, p=0.4, rng=ppt_rng(0, 0, 9))
        arrays = layout_arrays(spec, n, title_lens=lens, times=times, p=0.4, rng=ppt_rng(0, 0, 9))
        assert L._to_segments(arrays) == segs, spec
        assert positions_fed_arrays(arrays, lens) == positions_fed(segs, lens)
        assert arrays.kinds.dtype == np.int8


# ---------------------------------------------------------------------------------------------
# tools/inspect_patching.py


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_inspect_patching_json_worked_example():
    out = run_tool("--history-len", "23", "--stage", "pft-s", "--group-size", "5", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    expected = [{"kind": s.kind, "items": list(s.items)} for s in layout_pft_s(23, 5)]
    assert got == {"segments": expected, "positions": 3 * 2 + 5 * 2 + 5 * 2}
    assert got["segments"][0] == {"kind": "session", "items": [0, 1, 2]}


def test_inspect_patching_empty_history_and_bad_flags():
    out = run_tool("--history-len", "0", "--stage", "pft-s", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"segments": [], "positions": 0}
    bad = run_tool("--history-len", "23", "--stage", "pft-s", "--group-size", "0", "--json")
    assert bad.returncode != 0 and "--group-size" in bad.stderr and bad.stdout == ""
    bad = run_tool("--history-len", "-1", "--stage", "text", "--json")
    assert bad.returncode != 0 and "--history-len" in bad.stderr


def _tool_main(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("inspect_patching", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "inspect_patching", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main


def test_inspect_patching_picture_and_other_stages(capsys, monkeypatch):
    main = _tool_main(monkeypatch)
    assert main(["--history-len", "23", "--stage", "pft-s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["session [0-2]", "session [3-7]", "session [8-12]", "item 13"]
    assert "text 18" in lines and lines[-1] == "positions fed: 26 (all-text prompt: 46, 56.5%)"
    assert main(["--history-len", "11", "--stage", "pft-s"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "session [0]"
    assert main(["--history-len", "12", "--stage", "pft-i", "--item-len", "5", "--title-tokens", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["positions"] == 7 * 2 + 5 * 5
    assert main(["--history-len", "3000", "--stage", "budget", "--max-positions", "120", "--title-tokens", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["positions"] <= 120
    assert main(["--history-len", "40", "--stage", "ppt", "--p", "0.5", "--seed", "3", "--json"]) == 0
    first = capsys.readouterr().out
    assert main(["--history-len", "40", "--stage", "ppt", "--p", "0.5", "--seed", "3", "--json"]) == 0
    assert capsys.readouterr().out == first
    for argv, flag in (
        (["--history-len", "5", "--stage", "budget", "--max-positions", "1"], "--max-positions"),
        (["--history-len", "5", "--stage", "budget"], "--max-positions"),
        (["--history-len", "5", "--stage", "pft-s", "--item-len", "2"], "--item-len"),
        (["--history-len", "5", "--stage", "ppt", "--p", "2"], "--p"),
        (["--stage", "text", "--data", "s3://bucket/x"], "--data"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err


def test_layouts_survive_pickling_to_and_from_dataloader_workers():
    import pickle

    segs = layout_pft_s(40, 5)
    assert pickle.loads(pickle.dumps(segs)) == segs
    spec = LayoutSpec("budget", max_positions=64, group_size=4)
    assert pickle.loads(pickle.dumps(spec)) == spec
    arrays = pickle.loads(pickle.dumps(layout_arrays(spec, 300, title_lens=np.full(300, 5))))
    assert L._to_segments(arrays) == make_layout(spec, 300, title_lens=np.full(300, 5))
