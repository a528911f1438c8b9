"""Host process settings that only take effect at interpreter start-up: glibc malloc tunables.

XLA's CPU runtime allocates every executable's output and temporary buffers afresh on each call. glibc
serves allocations above 32 MiB (the most `mmap_threshold` can be raised to) with a new `mmap` and gives
them back with `munmap` when they are freed, so each call page-faults those buffers in again: the GRPO
update of the `tiny` benchmark shape faults ~2.4 GB per call, 4 KiB (or, with transparent huge pages,
2 MiB) at a time: 1.4-1.8 s of system time in a ~5 s update, and 1.9-3.5 s right after another
memory-hungry process has run (the TRL peer of the benchmark), when the kernel must also compact memory
to find huge pages.

The fix is to keep freed memory in the process and reuse it:

- `glibc.malloc.mmap_max=0`: no allocation is served by `mmap`; all come from the heap;
- `glibc.malloc.arena_max=1`: every thread allocates from the main (`brk`) heap, which can grow without
  bound (the per-thread arenas are 64 MiB heaps, too small for these buffers, so they would fall back
  to `mmap`);
- `glibc.malloc.trim_threshold=<64 GiB>`: freed memory at the top of the heap is not given back;
- `glibc.malloc.hugetlb=1` (glibc >= 2.35, THP mode `madvise`): the heap is backed by huge pages.

Then the buffers of one call are the reused memory of the last one: the update's system time drops to
~0.02 s and it stops depending on what ran before it. The process keeps its peak heap size (the `tiny`
benchmark's peak RSS was the same, 2.5 GB, either way). The tunables are read once when the process
starts, hence `reexec_with_malloc_tunables`: the console entry point and the benchmark scripts call it
first and, where it applies, run themselves again with the tunables added (child processes, e.g. the
environment workers and the benchmarks' peers, inherit them).

It applies to processes whose JAX backend is the CPU: JAX_PLATFORMS is `cpu`, or unset with no
accelerator plugin installed (`jax_plugins.*`, `libtpu`). On an accelerator host the big buffers live on
the device and a single malloc arena would only add lock contention. Set RWML_NO_REEXEC=1 to turn it off.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys

HEAP_TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1", f"glibc.malloc.trim_threshold={64 << 30}")
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
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


def _accelerator_plugin_installed() -> bool:
    """Whether a JAX accelerator backend is installed (found without importing jax)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        plugins = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        return False
    return plugins is not None and any(True for _ in pkgutil.iter_modules(plugins.submodule_search_locations))


def jax_runs_on_cpu(environ: dict[str, str] | None = None) -> bool:
    """JAX_PLATFORMS names only `cpu`, or it is unset and no accelerator plugin is installed."""
    env = os.environ if environ is None else environ
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    return not _accelerator_plugin_installed()


def malloc_tunables() -> tuple[str, ...]:
    """The tunables for this machine: `HEAP_TUNABLES` on glibc >= 2.26 (none elsewhere), plus
    `HUGE_PAGE_TUNABLE` on glibc >= 2.35 where the kernel's THP mode is `madvise`."""
    if not sys.platform.startswith("linux"):
        return ()
    version = _glibc_version()
    if version is None or version < (2, 26):
        return ()
    if version >= (2, 35) and _thp_mode() == "madvise":
        return (*HEAP_TUNABLES, HUGE_PAGE_TUNABLE)
    return HEAP_TUNABLES


def _set_tunables(env: dict[str, str]) -> list[str]:
    """The `name=value` items of GLIBC_TUNABLES, in order."""
    return [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]


def missing_tunables(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The tunables a re-exec would add: empty when RWML_NO_REEXEC is set, JAX does not run on the CPU,
    or GLIBC_TUNABLES already sets each of them (to any value: the user's choice wins)."""
    env = os.environ if environ is None else environ
    if env.get("RWML_NO_REEXEC") or not jax_runs_on_cpu(env):
        return ()
    present = {item.split("=")[0] for item in _set_tunables(env)}
    return tuple(t for t in malloc_tunables() if t.split("=")[0] not in present)


def environment_with_tunables(tunables: tuple[str, ...], environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment with `tunables` appended to GLIBC_TUNABLES (other tunables kept)."""
    env = dict(os.environ if environ is None else environ)
    env["GLIBC_TUNABLES"] = ":".join([*_set_tunables(env), *tunables])
    return env


def reexec_with_malloc_tunables(main_argv: list[str] | None = None) -> None:
    """Replace this process by the same command line with `missing_tunables()` set, if there are any.

    Call it first thing in a `main(argv=None)`, passing main's `argv`, before any work (the process
    restarts from the beginning). Returns without doing anything when `main_argv` is not None (main was
    called from Python, e.g. a test, not run as a program), when nothing is missing, or when the original
    command line is unknown.
    """
    argv = getattr(sys, "orig_argv", None)
    if main_argv is not None or not argv:
        return
    tunables = missing_tunables()
    if not tunables:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment_with_tunables(tunables))
