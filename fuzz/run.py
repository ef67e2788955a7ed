"""Run fuzz harnesses with atheris for a number of executions and sum up (scripts/fuzz).

    scripts/fuzz HARNESS [-n EXECUTIONS] [--corpus DIR] [--artifacts DIR] [-- LIBFUZZER FLAGS]

HARNESS is client-handshake, client-transmission, server-handshake, server-transmission
or all (one after the other). Each runs in a process of its own (libFuzzer exits the
process when it is done) on its corpus directory, seeded with the harness's seeds when
empty: DIR (DIR/HARNESS for all) or a new temporary one. For each harness one line says
the executions, the coverage libFuzzer saw last (``cov:`` edges and ``ft:`` features),
the corpus, and the crashes: libFuzzer stops at the first one and writes its input
under the artifacts directory (crash-*, oom-*, timeout-*); the line names the file and
the exception. libFuzzer's own output goes to HARNESS.log there. Exit status: 0, 1 if
a harness crashed, 2 for bad arguments or no atheris.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
HARNESSES = {
    "client-handshake": FUZZ / "fuzz_client_handshake.py",
    "client-transmission": FUZZ / "fuzz_client_transmission.py",
    "server-handshake": FUZZ / "fuzz_server_handshake.py",
    "server-transmission": FUZZ / "fuzz_server_transmission.py",
}
_STATUS = re.compile(r"\bcov: (\d+) ft: (\d+) corp: (\d+)/")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    """What libFuzzer said about one harness's run."""

    harness: str
    executions: int = 0
    seconds: int | None = None  # (libFuzzer says it only when it is done)
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    artifacts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    returncode: int = 0

    @property
    def crashed(self) -> bool:
        return bool(self.artifacts) or self.returncode != 0

    def line(self) -> str:
        took = "" if self.seconds is None else f" in {self.seconds} s"
        head = (
            f"{self.harness}: {self.executions} executions{took}, "
            f"cov: {self.cov} ft: {self.ft}, corpus: {self.corpus} inputs"
        )
        if not self.crashed:
            return head + ", crashes: 0"
        what = "; ".join(self.errors) or f"exit status {self.returncode}"
        return f"{head}, CRASH: {what}; input: {', '.join(self.artifacts) or '(none written)'}"


def parse(harness: str, output: str, returncode: int) -> Result:
    """A :class:`Result` from libFuzzer's output (stderr and stdout together)."""
    result = Result(harness, returncode=returncode)
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if m := _STATUS.search(line):
            result.cov, result.ft, result.corpus = map(int, m.groups())
        elif m := _DONE.match(line):
            result.executions, result.seconds = int(m[1]), int(m[2])
        elif m := _EXECUTED.match(line):
            result.executions = int(m[1])
        elif m := _ARTIFACT.search(line):
            result.artifacts.append(m[1])
        elif "=== Uncaught Python exception: ===" in line:
            # The exception's own line ends its traceback (before a blank line).
            tail = [t for t in lines[i + 1 :] if t.strip()]
            stop = next((j for j, t in enumerate(tail) if t.startswith("==")), len(tail))
            result.errors.append(tail[stop - 1].strip() if stop else "uncaught exception")
        elif (m := re.search(r"ERROR: libFuzzer: (.*)", line)) and not result.errors:
            # (after a Python exception libFuzzer only says the target exited)
            result.errors.append(f"libFuzzer: {m[1].strip()}")
        elif line.startswith("#") and "pulse" not in line and (m := re.match(r"#(\d+)", line)):
            result.executions = max(result.executions, int(m[1]))
    return result


def run(harness: str, runs: int, corpus: Path, artifacts: Path, extra: list[str]) -> Result:
    """Fuzz ``harness`` for ``runs`` executions; libFuzzer's output goes to a log."""
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(HARNESSES[harness]),
        f"-runs={runs}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        *extra,
        str(corpus),
    ]
    log = artifacts / f"{harness}.log"
    with log.open("w") as out:  # (written as it goes: a long run can be watched)
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    return parse(harness, log.read_text(errors="replace"), proc.returncode)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, extra = args[:cut], args[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="scripts/fuzz", description="Run pynbd's atheris harnesses (fuzz/)."
    )
    parser.add_argument("harness", choices=[*HARNESSES, "all"])
    parser.add_argument("-n", "--runs", type=int, default=100_000, metavar="EXECUTIONS")
    parser.add_argument("--corpus", type=Path, metavar="DIR", help="kept between runs")
    parser.add_argument("--artifacts", type=Path, metavar="DIR", help="crash inputs and logs")
    opts = parser.parse_args(args)
    if opts.runs < 1:
        parser.error("EXECUTIONS must be at least 1")
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        print("scripts/fuzz: atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    names = list(HARNESSES) if opts.harness == "all" else [opts.harness]
    artifacts = opts.artifacts or Path(tempfile.mkdtemp(prefix="pynbd-fuzz-"))
    crashed = False
    for name in names:
        if opts.corpus is None:
            corpus = Path(tempfile.mkdtemp(prefix=f"pynbd-fuzz-{name}-"))
        else:
            corpus = opts.corpus / name if opts.harness == "all" else opts.corpus
        result = run(name, opts.runs, corpus, artifacts, extra)
        print(result.line(), flush=True)
        crashed |= result.crashed
    print(f"(corpus: {opts.corpus or 'temporary'}; logs and crash inputs: {artifacts})")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
