"""What Linux's ``/proc/cpuinfo`` says about the CPU: one reader for the node, its kernels, tests and benches.

Each key's first occurrence in the file counts: on x86 that is the first CPU's ``flags`` and ``model name``; on ARM
the first CPU's ``Features`` and the trailing ``Hardware`` line. Where the file cannot be read (macOS, a sandbox),
every answer is empty or None and callers fall back to what their platform offers.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """``key: value`` lines of cpuinfo text, keys lower case, the first occurrence of each key kept."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


@cache
def cpuinfo() -> dict[str, str]:
    """This machine's :func:`parse_cpuinfo` (read once per process); empty where there is no readable file."""
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return {}


def parse_cpuinfo_flags(text: str) -> frozenset[str] | None:
    """The feature flags (lower case) in cpuinfo text: x86 ``flags``, ARM ``Features``; None if it has neither."""
    return _flags(parse_cpuinfo(text))


def cpuinfo_flags() -> frozenset[str] | None:
    """This machine's feature flags from ``/proc/cpuinfo``, or None where it does not say."""
    return _flags(cpuinfo())


def cpu_model() -> str | None:
    """The CPU's name: x86 ``model name``, else ARM's ``Hardware`` or ``cpu model``; None where not said."""
    fields = cpuinfo()
    for key in ("model name", "hardware", "cpu model"):
        if fields.get(key):
            return fields[key]
    return None


def cpu_vendor() -> str | None:
    """x86 ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``), else None."""
    return cpuinfo().get("vendor_id") or None


def _flags(fields: dict[str, str]) -> frozenset[str] | None:
    for key in ("flags", "features"):
        if key in fields:
            return frozenset(fields[key].lower().split())
    return None
