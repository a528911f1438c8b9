"""rwml_jax.platform's host settings: the glibc malloc tunables, what they do, and the re-exec that applies them."""

import os
import subprocess
import sys
import textwrap

import pytest

from rwml_jax import platform

needs_tunables = pytest.mark.skipif(not platform.malloc_tunables(), reason="needs Linux with glibc >= 2.26")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RWML_NO_REEXEC", "JAX_PLATFORMS")}
    env.update(extra)
    return env


def test_tunables_are_appended_to_existing_ones():
    env = platform.environment_with_tunables(("x.y=1", "x.z=2"), {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0",
                                                                 "A": "b"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:x.y=1:x.z=2"
    assert env["A"] == "b"
    assert platform.environment_with_tunables(("x.y=1",), {})["GLIBC_TUNABLES"] == "x.y=1"


@needs_tunables
def test_missing_tunables_respect_the_users_values_and_the_backend():
    everything = platform.malloc_tunables()
    assert set(platform.HEAP_TUNABLES) <= set(everything)
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert platform.missing_tunables(cpu) == everything
    # a tunable the user set, to any value, is left alone; the others are still added
    mine = platform.missing_tunables({**cpu, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert mine == tuple(t for t in everything if not t.startswith("glibc.malloc.arena_max="))
    assert platform.missing_tunables({**cpu, "GLIBC_TUNABLES": ":".join(everything)}) == ()
    assert platform.missing_tunables({**cpu, "RWML_NO_REEXEC": "1"}) == ()
    # an accelerator backend keeps glibc's defaults
    assert platform.missing_tunables({"JAX_PLATFORMS": "cuda"}) == ()
    assert platform.missing_tunables({"JAX_PLATFORMS": "tpu,cpu"}) == ()


@needs_tunables
def test_heap_tunables_stop_refaulting_large_buffers():
    """What the tunables are for: a freed 256 MiB buffer, allocated and written again, is page-faulted in
    afresh with glibc's defaults (a new mmap: ~65k faults, or 128 with 2 MiB pages) and costs next to no
    faults with the heap tunables (reused memory)."""
    probe = textwrap.dedent("""
        import ctypes, resource
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        n = 256 << 20
        p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n); ctypes.memset(p, 2, n); libc.free(p)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)

    def faults(tunables):
        env = _clean_env(GLIBC_TUNABLES=tunables)
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                             check=True)
        return int(out.stdout)

    default, tuned = faults(""), faults(":".join(platform.HEAP_TUNABLES))
    assert default >= (256 << 20) // (2 << 20)  # at least one fault per page, even with 2 MiB pages (THP "always")
    assert tuned * 20 < default


@needs_tunables
def test_reexec_restarts_the_same_command_once_with_the_tunables(tmp_path):
    """A program calling reexec_with_malloc_tunables() runs twice: first without the tunables, then
    (after the exec, same arguments) with them, and the second run does not exec again."""
    script = tmp_path / "prog.py"
    log = tmp_path / "log"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        with open({str(log)!r}, "a") as f:
            f.write(repr((os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:])) + "\\n")
        from rwml_jax import platform
        platform.reexec_with_malloc_tunables()
        print("done")
    """))
    out = subprocess.run([sys.executable, str(script), "--x", "1"], env=_clean_env(JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "done"
    runs = log.read_text().splitlines()
    assert runs == [repr(("", ["--x", "1"])), repr((":".join(platform.malloc_tunables()), ["--x", "1"]))]
