"""The kernel soak (soak.py) runs a few cycles and kills in the guest and reports them.

The full soak (200 cycles, 50 kills) is run by hand, not in CI: ``python -m
tests.kernel.soak``.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.kernel.soak import soak


@pytest.mark.timeout(600)  # an outer bound under TCG, not a figure
def test_a_short_soak_passes_and_counts_what_it_did(nbd_module: None, tmp_path: Path) -> None:
    out = io.StringIO()
    figures = soak(tmp_path, cycles=3, kills=1, seed=5, out=out)
    report = figures.report()
    print(out.getvalue() + report)
    assert figures.failures == [], report
    assert figures.kernel_lines == [] and not figures.lost, report
    assert (figures.cycles, figures.netlink, figures.ioctl) == (3, 2, 1)
    # Each cycle compares its own pattern, the previous one's, and the server's copy;
    # the end compares all of them in the server's file again.
    assert figures.patterns_checked == 3 + 2 + 3 + 3
    assert figures.fds[0] == figures.fds[1] and figures.threads[0] == figures.threads[1]
    assert figures.kills == 1 and figures.reconnects >= 1
    assert figures.acknowledged > 0 and figures.verified == figures.acknowledged
    assert figures.files + figures.blocks == figures.acknowledged
    assert figures.fsck.count("clean") == 2
    assert report.endswith("soak: PASSED")
