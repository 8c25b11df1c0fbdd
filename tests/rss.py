"""How much a piece of work grows this process's resident memory at its peak (Linux: VmHWM, reset
through /proc/self/clear_refs before the work)."""
from __future__ import annotations

from pathlib import Path

import pytest

STATUS = Path("/proc/self/status")


def _kib(field: str) -> int:
    line = next(line for line in STATUS.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def peak_growth(work) -> tuple[int, object]:
    """(bytes the peak resident set rose above the resident set before `work()`, what it returned or
    raised)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the current size
    except OSError:
        pytest.skip("this system cannot reset the peak resident set (/proc/self/clear_refs)")
    before = _kib("VmRSS")
    try:
        outcome = work()
    except Exception as error:  # noqa: BLE001 - the caller looks at what was raised
        outcome = error
    return (_kib("VmHWM") - before) * 1024, outcome
