"""Host process settings that only take effect at interpreter start-up: glibc malloc and huge pages.

XLA's CPU runtime allocates every executable's output and temporary buffers afresh on each call. glibc
serves allocations above 32 MiB with a new `mmap`, so each call page-faults those buffers in again, 4 KiB
at a time: producing a fresh 64 MiB array costs ~35 ms of faulting on a 2-core machine against ~5 ms of
arithmetic, and the GRPO update of the `tiny` benchmark shape spent ~12 % of its time there. With the
glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks the kernel for transparent huge pages
(`madvise(MADV_HUGEPAGE)`), 2 MiB at a time, which removes most of that cost. The tunable is read once
when the process starts, hence `reexec_with_huge_pages`: the console entry point and the benchmark
scripts call it first and, where it helps, run themselves again with the tunable added.

It helps only where the kernel's THP mode is `madvise` (with `always` the kernel already does it, with
`never` it cannot). Set RWML_NO_REEXEC=1 to turn it off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def _thp_mode() -> str | None:
    try:
        with open(_THP_MODE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_would_help(environ: dict[str, str] | None = None) -> bool:
    """Whether re-executing with `TUNABLE` changes anything: Linux, glibc >= 2.35, THP mode `madvise`,
    the tunable not set yet, and RWML_NO_REEXEC unset."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or env.get("RWML_NO_REEXEC"):
        return False
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    version = _glibc_version()
    return version is not None and version >= (2, 35) and _thp_mode() == "madvise"


def environment_with_huge_pages(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment with `TUNABLE` appended to GLIBC_TUNABLES (other tunables kept)."""
    env = dict(os.environ if environ is None else environ)
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def reexec_with_huge_pages(main_argv: list[str] | None = None) -> None:
    """Replace this process by the same command line with `TUNABLE` set, when `huge_pages_would_help`.

    Call it first thing in a `main(argv=None)`, passing main's `argv`, before any work (the process
    restarts from the beginning). Returns without doing anything when `main_argv` is not None (main was
    called from Python, e.g. a test, not run as a program), when it would not help, or when the original
    command line is unknown.
    """
    argv = getattr(sys, "orig_argv", None)
    if main_argv is not None or not argv or not huge_pages_would_help():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment_with_huge_pages())
