"""Kill a run with SIGKILL during the rwml stage, rerun the same command, and compare with a clean run.

The resumed run must finish with the same number of steps, visit the same batches in the same order,
produce the same held-out evaluations and parameters, and reuse (not recompute) every earlier stage.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # three pipeline runs: ~10 min on an idle 2-core machine

pytest.importorskip("alfworld", reason="needs the alfworld package")

from rwml_jax.config import load_config
from rwml_jax.train.run import run_stages
from rwml_jax.train.stage_io import read_json, read_jsonl

OVERRIDES = [
    "--config.warmstart.steps=6", "--config.warmstart.num_games=8", "--config.env.num_generated_games=6",
    "--config.rwml.max_steps=4", "--config.checkpoint.every_steps=2", "--config.rwml.eval_every=2",
    "--config.filter.num_samples=2", "--config.rwml.eval_size=4",
]
UPSTREAM = ("warmstart", "collect", "triplets", "filter")


def _cmd(work: Path) -> list[str]:
    return [sys.executable, "-m", "rwml_jax.cli", "rwml", "demo_cpu:smoke", f"--config.work_dir={work}", *OVERRIDES]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume") / "base"
    run_stages(load_config("demo_cpu:smoke", [f"--config.work_dir={work}", *OVERRIDES]), UPSTREAM)
    return work


def _done_markers(work: Path) -> dict[str, tuple[float, dict]]:
    return {s: (os.path.getmtime(work / s / "DONE.json"), read_json(work / s / "DONE.json")) for s in UPSTREAM}


def test_sigkill_during_rwml_then_resume_matches_clean_run(upstream, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    shutil.copytree(upstream, clean)
    shutil.copytree(upstream, killed)
    before = _done_markers(killed)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    subprocess.run(_cmd(clean), check=True, env=env, timeout=1800, stdout=subprocess.DEVNULL)

    proc = subprocess.Popen(_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = killed / "rwml" / "checkpoints" / "2"
    deadline = time.time() + 1500
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists() and proc.poll() is None, "the run ended (or stalled) before its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "rwml" / "DONE.json").exists()

    subprocess.run(_cmd(killed), check=True, env=env, timeout=1800, stdout=subprocess.DEVNULL)

    # No earlier stage was recomputed, and the rwml stage finished with the clean run's steps and data.
    assert _done_markers(killed) == before
    done_clean = read_json(clean / "rwml" / "DONE.json")["summary"]
    done_killed = read_json(killed / "rwml" / "DONE.json")["summary"]
    assert done_killed["steps"] == done_clean["steps"] == 4
    batches = [read_jsonl(w / "rwml" / "batches.jsonl") for w in (clean, killed)]
    assert [b["step"] for b in batches[1]] == [0, 1, 2, 3]
    assert batches[0] == batches[1]
    evals = [[(e["step"], e["mean_reward"]) for e in read_jsonl(w / "rwml" / "eval.jsonl")] for w in (clean, killed)]
    assert evals[0] == evals[1]

    from rwml_jax.models import load_pretrained

    (_, p_clean), (_, p_killed) = (load_pretrained(w / "rwml" / "model") for w in (clean, killed))
    import jax

    for a, b in zip(jax.tree.leaves(p_clean), jax.tree.leaves(p_killed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
