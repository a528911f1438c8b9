"""rwml_jax.hostenv: the glibc huge-page tunable and the re-exec that applies it."""

import os
import subprocess
import sys
import textwrap

import pytest

from rwml_jax import hostenv


def test_tunable_is_appended_to_existing_ones():
    env = hostenv.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1", "A": "b"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.trim_threshold=1:{hostenv.TUNABLE}"
    assert env["A"] == "b"
    assert hostenv.environment_with_huge_pages({})["GLIBC_TUNABLES"] == hostenv.TUNABLE


def test_no_reexec_when_set_or_disabled():
    assert not hostenv.huge_pages_would_help({"GLIBC_TUNABLES": hostenv.TUNABLE})
    assert not hostenv.huge_pages_would_help({"RWML_NO_REEXEC": "1"})


@pytest.mark.skipif(not hostenv.huge_pages_would_help({}), reason="needs Linux, glibc >= 2.35 and THP mode madvise")
def test_reexec_restarts_the_same_command_once_with_the_tunable(tmp_path):
    """A program calling reexec_with_huge_pages() runs twice: first without the tunable, then (after the
    exec, same arguments) with it, and the second run does not exec again."""
    script = tmp_path / "prog.py"
    log = tmp_path / "log"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        with open({str(log)!r}, "a") as f:
            f.write(repr((os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:])) + "\\n")
        from rwml_jax import hostenv
        hostenv.reexec_with_huge_pages()
        print("done")
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RWML_NO_REEXEC")}
    out = subprocess.run([sys.executable, str(script), "--x", "1"], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "done"
    runs = log.read_text().splitlines()
    assert runs == [repr(("", ["--x", "1"])), repr((hostenv.TUNABLE, ["--x", "1"]))]
