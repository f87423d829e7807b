"""Sampling profiles of a bench's service processes, one per phase (py-spy), and their summary.

``PhaseProfiler(directory, pids)`` runs ``py-spy record`` on each pid while a phase runs
(``with profiler.phase("burst"):``) and leaves ``directory/<phase>-<pid>.txt`` in py-spy's "raw"
form (one collapsed stack and its sample count per line). ``summarize(file)`` reads one back:
the samples, and the share of them under each function (inclusive) and at each function
(the innermost frame). Only the thread that holds the GIL is sampled (``--gil``): the service's
threads take turns on it, so a thread waiting for it is not using CPU, and counting it (py-spy's
default) made the store's writer look three times its size. A profile run is for where the time goes; its CPU figures are not the
bench's (py-spy takes a little CPU of its own), so a bench reports them from a run without it.

py-spy is not a dependency of the project; ``PhaseProfiler.available()`` says whether it is on
PATH or beside the interpreter, and ``python bench/profiling.py FILE...`` prints summaries.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

PY_SPY_RATE = 200  # samples a second: 30 s give 6,000 samples per process


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter or on PATH; None without one."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.access(beside, os.X_OK) else shutil.which("py-spy")


class PhaseProfiler:
    """Samples the given pids during each :meth:`phase`; writes one raw profile per phase and pid."""

    def __init__(self, directory: str, pids: list[int]):
        self.directory = directory
        self.pids = pids
        self.executable = py_spy()
        if self.executable is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        os.makedirs(directory, exist_ok=True)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Sample while the block runs; py-spy writes its file when SIGINT ends it."""
        recorders = [subprocess.Popen(
            [self.executable, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE), "--format", "raw",
             "--gil", "--nonblocking", "--output", os.path.join(self.directory, f"{name}-{pid}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in self.pids]
        try:
            yield
        finally:
            for recorder in recorders:
                recorder.send_signal(signal.SIGINT)
            for recorder in recorders:
                try:
                    recorder.wait(30)
                except subprocess.TimeoutExpired:
                    recorder.kill()
                    recorder.wait()


def read_raw(path: str) -> Counter:
    """A raw py-spy profile as {stack (outermost first, a tuple of frames): samples}."""
    stacks: Counter = Counter()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def function_of(frame: str) -> str:
    """``name (file.py:line)`` -> ``name (file.py)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(path: str, top: int = 25) -> dict:
    """Samples, and the largest inclusive and innermost shares (percent of samples) by function."""
    stacks = read_raw(path)
    total = sum(stacks.values())
    inclusive: Counter = Counter()
    innermost: Counter = Counter()
    for stack, count in stacks.items():
        for function in {function_of(frame) for frame in stack}:
            inclusive[function] += count
        innermost[function_of(stack[-1])] += count
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total,
            "inclusive": [(name, share(n)) for name, n in inclusive.most_common(top)],
            "innermost": [(name, share(n)) for name, n in innermost.most_common(top)]}


def main(argv: list[str]) -> int:
    """Print each named raw profile's summary."""
    for path in argv:
        summary = summarize(path)
        print(f"== {path}: {summary['samples']} samples")
        for title in ("inclusive", "innermost"):
            print(f"-- {title}")
            for name, percent in summary[title]:
                print(f"{percent:6.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
