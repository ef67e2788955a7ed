"""The junit xml report pytest writes in the guest, read back on the host, and the
key that matches each ``<testcase>`` to a pytest node id."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import IO, Literal

from tests.guest.host import VMError

Outcome = Literal["passed", "failed", "error", "skipped"]


@dataclass(frozen=True)
class CaseResult:
    """One ``<testcase>`` of a junit xml report, as pytest writes it.

    Attributes:
        classname: the dotted module path and classes (``tests.kernel.test_x.TestY``).
        name: the test function's name, parameters included (``test_z[1]``).
        outcome: ``failed`` when a ``<failure>`` is present (the test, or an xpass with
            strict xfail), ``error`` for a setup or teardown error, ``skipped`` (skips
            and xfails), else ``passed``.
        message: the failure, error or skip message.
        details: the text of the failure, error or skip elements (pytest's report).
        output: the test's captured stdout, stderr and log (``system-out``, ``system-err``).
        seconds: the time pytest gave.
    """

    classname: str
    name: str
    outcome: Outcome
    message: str = ""
    details: str = ""
    output: str = ""
    seconds: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        """``(classname, name)``, the value :func:`junit_key` gives for its node id."""
        return (self.classname, self.name)


def junit_key(nodeid: str) -> tuple[str, str]:
    """Return the ``(classname, name)`` pair pytest's junit xml gives test *nodeid*.

    ``tests/kernel/test_x.py::TestY::test_z[a::b]`` becomes
    ``("tests.kernel.test_x.TestY", "test_z[a::b]")``: the path's slashes become dots and
    ``.py`` goes; parameters (after the first ``[``) are kept as they are.
    """
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def _has_output(text: str | None) -> bool:
    # With junit_logging=all pytest writes "--- Captured Out ---" headers even when
    # nothing was captured.
    lines = (text or "").splitlines()
    return any(line.strip() and not re.fullmatch(r"-+ Captured \w+ -+", line) for line in lines)


def parse_junit(source: str | os.PathLike[str] | IO[bytes]) -> list[CaseResult]:
    """Read the test cases of a junit xml report written by pytest.

    Raises:
        VMError: the file is missing or is not junit xml.
    """
    try:
        tree = ET.parse(source)
    except (OSError, ET.ParseError) as exc:
        raise VMError(f"cannot read the guest's junit xml: {exc}") from exc
    cases: list[CaseResult] = []
    for case in tree.getroot().iter("testcase"):
        found = {child.tag: child for child in case}
        outcome: Outcome = "passed"
        for tag in ("skipped", "error", "failure"):  # the last one present wins
            if tag in found:
                outcome = "failed" if tag == "failure" else tag
        messages, details, output = [], [], []
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                if child.get("message"):
                    messages.append(child.get("message", ""))
                if child.text and child.text.strip():
                    details.append(child.text.rstrip())
            elif child.tag in ("system-out", "system-err") and _has_output(child.text):
                output.append(f"--- {child.tag}\n{(child.text or '').rstrip()}")
        try:
            seconds = float(case.get("time", "0"))
        except ValueError:
            seconds = 0.0
        cases.append(
            CaseResult(
                classname=case.get("classname", ""),
                name=case.get("name", ""),
                outcome=outcome,
                message="\n".join(messages),
                details="\n\n".join(details),
                output="\n".join(output),
                seconds=seconds,
            )
        )
    return cases
