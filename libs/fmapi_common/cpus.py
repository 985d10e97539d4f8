"""The CPUs a process may use, and CPU lists as people write them ("0-2,5")."""

from __future__ import annotations

import os

# Linux's largest configurable CPU count (CONFIG_NR_CPUS): no CPU id reaches it.
MAX_CPUS = 8192


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; every CPU where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> set[int]:
    """``"0-2,5"`` as ``{0, 1, 2, 5}``; ValueError naming what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"{text!r} is not a CPU list such as 0-2,5") from None
        if first < 0 or last < first:
            raise ValueError(f"{part.strip()!r} in {text!r} is not a CPU range")
        if last >= MAX_CPUS:
            raise ValueError(f"CPU {last} in {text!r}: CPU ids are below {MAX_CPUS}")
        cpus.update(range(first, last + 1))
    return cpus
