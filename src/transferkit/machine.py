"""Which machine a speed figure was measured on: CPU name, the instruction sets that decide INT8 and fp32 speed,
core count, and the load while it was measured.

`--runtime auto` trusts a throughput only when it was measured on a machine like this one: an INT8 artifact that
is 2.7x fp32 on a CPU with AVX-512 VNNI can be slower than fp32 on one with AVX2 alone, so a number from the
export machine says nothing about a different serving machine. Imports nothing heavy (serving image).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The flags (as /proc/cpuinfo spells them) that change which kernels ONNX Runtime and OpenVINO pick.
SPEED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, which containers and taskset narrow), not the host's: what
    serving's workers and threads, scoring's actors and a local Ray cluster are sized by."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Machine:
    cpu: str  # the CPU's model name
    flags: tuple[str, ...]  # the SPEED_FLAGS it has
    cores: int  # logical CPUs this process may use

    @classmethod
    def this(cls) -> Machine:
        name, flags = _cpuinfo()
        return cls(name, tuple(f for f in SPEED_FLAGS if f in flags), cpu_count())

    def same_kind(self, other: Machine | None) -> bool:
        """The same CPU model, instruction sets and core count: its speed figures hold here."""
        return other is not None and (self.cpu, self.flags, self.cores) == (other.cpu, other.flags, other.cores)

    @property
    def vnni(self) -> bool:
        """INT8 dot-product instructions (what makes INT8 convolutions 2-4x fp32 on a CPU)."""
        return any(f in self.flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    def describe(self) -> str:
        return f"{self.cpu} ({self.cores} CPUs; {' '.join(self.flags) or 'no AVX2'})"

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "flags": list(self.flags), "cores": self.cores}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Machine:
        return cls(str(d.get("cpu", "")), tuple(d.get("flags") or ()), int(d.get("cores", 0)))


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the name platform gives, no flags (measurements still compare by name)
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def load_average() -> float | None:
    """The 1-minute load average (runnable processes): beside a speed figure it says whether the cores were idle."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def interleaved_medians(calls: Sequence[Callable[[], object]], repeats: int, warmup: int = 2) -> list[float]:
    """The median wall time in seconds of each of `calls`, timed round-robin: every round calls each once, in
    order, so a spell of other work on the machine slows all of them alike rather than whichever was being timed
    when it came, and figures compared side by side stay fair. The first `warmup` rounds are not timed (first
    calls allocate, pick kernels, compile)."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for spent, call in zip(times, calls):
            t = time.perf_counter()
            call()
            spent.append(time.perf_counter() - t)
    return [statistics.median(spent) for spent in times]


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The median wall time of `repeats` calls, after `warmup` untimed ones (first calls allocate)."""
    (seconds,) = interleaved_medians([call], repeats, warmup)
    return seconds
