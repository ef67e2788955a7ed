"""intersect(): two block status maps of one range, cut where either changes."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pynbd.client import extents
from pynbd.client.base import MappedExtent
from pynbd.client.extents import Piece, intersect


def _map(start: int, lengths: list[int], flags: list[int]) -> list[MappedExtent]:
    out, pos = [], start
    for n, f in zip(lengths, flags, strict=False):
        out.append(MappedExtent(pos, n, f))
        pos += n
    return out


def test_docstring_example() -> None:
    assert doctest.testmod(extents).failed == 0


def test_cuts_where_either_changes() -> None:
    a = _map(100, [10, 10], [0, 3])
    b = _map(100, [5, 10, 5], [1, 0, 1])
    assert list(intersect(a, b)) == [
        Piece(100, 5, 0, 1),
        Piece(105, 5, 0, 0),
        Piece(110, 5, 3, 0),
        Piece(115, 5, 3, 1),
    ]


def test_stops_at_the_shorter_map() -> None:
    assert list(intersect(_map(0, [10], [0]), _map(0, [4], [1]))) == [Piece(0, 4, 0, 1)]


def test_empty_map() -> None:
    assert list(intersect([], _map(0, [4], [1]))) == []


def test_different_starts_refused() -> None:
    with pytest.raises(ValueError, match="start at 0 and 4"):
        list(intersect(_map(0, [8], [0]), _map(4, [4], [0])))


def test_gap_refused() -> None:
    a = [MappedExtent(0, 4, 0), MappedExtent(8, 4, 0)]
    with pytest.raises(ValueError, match="gap at offset 4"):
        list(intersect(a, _map(0, [12], [0])))


lengths = st.lists(st.integers(1, 50), min_size=1, max_size=20)


@given(lengths, lengths, st.data())
def test_pieces_tile_the_common_range(la: list[int], lb: list[int], data: st.DataObject) -> None:
    fa = data.draw(st.lists(st.integers(0, 3), min_size=len(la), max_size=len(la)))
    fb = data.draw(st.lists(st.integers(0, 1), min_size=len(lb), max_size=len(lb)))
    a, b = _map(7, la, fa), _map(7, lb, fb)
    pieces = list(intersect(a, b))
    pos = 7
    for p in pieces:
        assert p.offset == pos and p.length > 0
        # Each piece lies inside one extent of each map, with that extent's flags.
        for m, flags in ((a, p.flags_a), (b, p.flags_b)):
            (ext,) = [e for e in m if e.offset <= p.offset < e.offset + e.length]
            assert p.offset + p.length <= ext.offset + ext.length and ext.flags == flags
        pos += p.length
    assert pos == 7 + min(sum(la), sum(lb))
