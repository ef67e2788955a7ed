"""Walking two block status maps of one range together.

A dirty bitmap (``qemu:dirty-bitmap:NAME``) says what changed; ``base:allocation`` says
whether it reads as zeroes. Both answer for the same range with extents cut in different
places: :func:`intersect` cuts the range wherever either map changes, so each piece has
one value in each map::

    >>> a = [MappedExtent(0, 8, 0), MappedExtent(8, 8, 3)]
    >>> b = [MappedExtent(0, 4, 1), MappedExtent(4, 12, 0)]
    >>> [tuple(piece) for piece in intersect(a, b)]
    [(0, 4, 0, 1), (4, 4, 0, 0), (8, 8, 3, 0)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from .base import MappedExtent


class Piece(NamedTuple):
    """A part of a range over which neither of two maps changes."""

    offset: int
    length: int
    flags_a: int
    flags_b: int


def intersect(a: Sequence[MappedExtent], b: Sequence[MappedExtent]) -> Iterator[Piece]:
    """The pieces of the range both maps cover, from their common start, in order.

    The maps must be sorted, without gaps, and start at the same offset (as
    :meth:`~pynbd.client.Client.block_status_all` returns them). The walk stops where
    the shorter map ends.

    Raises:
        ValueError: the maps start at different offsets, or one has a gap.
    """
    if not a or not b:
        return
    if a[0].offset != b[0].offset:
        raise ValueError(f"the maps start at {a[0].offset} and {b[0].offset}")
    i = j = 0
    pos = a[0].offset
    while i < len(a) and j < len(b):
        ea, eb = a[i], b[j]
        if ea.offset > pos or eb.offset > pos:
            raise ValueError(f"a map has a gap at offset {pos}")
        end_a, end_b = ea.offset + ea.length, eb.offset + eb.length
        end = min(end_a, end_b)
        if end > pos:
            yield Piece(pos, end - pos, ea.flags, eb.flags)
            pos = end
        if end_a <= pos:
            i += 1
        if end_b <= pos:
            j += 1


__all__ = ["Piece", "intersect"]
