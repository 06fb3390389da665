"""Shared bits of the benchmarks: machine description and report writing."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    import numba
    import numpy

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {mem_gib:.1f} GiB RAM, {platform.system()} {platform.release()}",
        f"- versions: Python {sys.version.split()[0]}, numba {numba.__version__}, numpy {numpy.__version__}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def write_report(name: str, text: str) -> Path:
    REPORTS.mkdir(exist_ok=True)
    path = REPORTS / name
    path.write_text(text)
    print(f"[bench] wrote {path}", file=sys.stderr)
    return path
