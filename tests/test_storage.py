"""Run files in a bucket: a stage runs with work_dir=gs://... on a fake GCS (tests/fake_gcs.py: fsspec for
files, TensorStore's file driver for orbax's arrays), is SIGKILLed after a checkpoint, resumes, and ends
exactly where an uninterrupted run does; gs:// without a backend, or a scheme nothing serves, fails config
validation with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwml_jax import storage
from rwml_jax.config import ConfigError, load_config
from rwml_jax.train.metrics_log import read_metrics, series

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_url_schemes_without_a_backend_fail_validation_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"URL scheme hdfs:// is not supported; use a local path or one of gs://, s3://"):
        load_config("demo_cpu:smoke", ["--config.work_dir=hdfs://cluster/runs/x"])
    with pytest.raises(ConfigError, match=r"execution.compilation_cache='ftp://h/c': URL scheme ftp://"):
        load_config("demo_cpu:smoke", ["--config.execution.compilation_cache=ftp://h/c"])
    if storage._backend_available("gs"):
        pytest.skip("a gs:// backend (gcsfs / tensorflow) is installed here")
    with pytest.raises(ConfigError, match=r"work_dir='gs://bucket/run': gs:// needs the gcsfs package, which is not "
                                          r"installed here: pip install gcsfs"):
        load_config("demo_cpu:smoke", ["--config.work_dir=gs://bucket/run"])
    with pytest.raises(storage.StorageError, match="needs the gcsfs package"):
        storage.as_path("gs://bucket/run/x.json")
    assert not (tmp_path / "gs:").exists()
    assert load_config("demo_cpu:smoke", [f"--config.work_dir={tmp_path}/run"]).work_dir == f"{tmp_path}/run"


def test_local_paths_stay_pathlib(tmp_path):
    assert storage.as_path(tmp_path / "a") == tmp_path / "a" and isinstance(storage.as_path(str(tmp_path)), Path)
    assert storage.url_scheme("gs://b/x") == "gs" and storage.url_scheme("/tmp/x") is None
    assert storage.local_copy(tmp_path) == os.fspath(tmp_path)


# warmstart alone: generated games, tokenizer, 12 SFT steps with a checkpoint every 2
OVERRIDES = ["--config.warmstart.num_games=4", "--config.warmstart.epochs=4", "--config.warmstart.steps=12",
             "--config.checkpoint.every_steps=2", "--config.env.num_workers=1", "--config.logging.tensorboard=true"]


def _cli(root: Path, work: str) -> list[str]:
    return [sys.executable, str(TESTS / "fake_gcs.py"), str(root), "-m", "rwml_jax.cli", "warmstart", "demo_cpu:smoke",
            f"--config.work_dir={work}", *OVERRIDES]


@pytest.mark.timeout(1500)
def test_stage_in_a_bucket_killed_and_resumed_exactly(tmp_path):
    root = tmp_path / "gcs"
    env = dict(os.environ, PYTHONUNBUFFERED="1", RWML_CACHE_DIR=str(tmp_path / "cache"), RWML_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RWML_FAKE_GCS", None)
    run = dict(env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clean = subprocess.Popen(_cli(root, "gs://bkt/clean"), **run)
    killed = subprocess.Popen(_cli(root, "gs://bkt/killed"), **run, start_new_session=True)
    ckpt = root / "bkt" / "killed" / "warmstart" / "checkpoints" / "2" / "commit_success.txt"
    deadline = time.time() + 1200
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists() and killed.poll() is None, killed.communicate()[0][-3000:] if killed.poll() is not None else "stalled"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    stage = root / "bkt" / "killed" / "warmstart"
    assert (stage / "STARTED.json").exists() and not (stage / "DONE.json").exists()
    out, _ = clean.communicate(timeout=1200)
    assert clean.returncode == 0, out[-3000:]

    resumed = subprocess.run(_cli(root, "gs://bkt/killed"), **run, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "outputs in gs://bkt/killed/" in resumed.stdout

    # nothing went to a local folder named gs: (or anywhere else outside the bucket and the host cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "gcs"]
    a, b = root / "bkt" / "clean" / "warmstart", stage
    done_a, done_b = (json.loads((d / "DONE.json").read_text()) for d in (a, b))
    assert done_a["summary"] == done_b["summary"] and done_a["summary"]["final_loss"] == done_b["summary"]["final_loss"]
    # every step's loss is logged (the last record of a step counts, as `read_metrics` readers do), the same
    clean_loss, resumed_loss = (series(read_metrics(d), "warmstart/loss") for d in (a, b))
    assert clean_loss == resumed_loss and clean_loss[0] == list(range(1, 13))
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()
    assert list((b / "tb").iterdir())  # tensorboard events uploaded to the bucket
    assert (root / "bkt" / "killed" / "config.json").exists()
    assert any((root / "bkt" / "killed" / ".jax_cache").iterdir())  # the compilation cache, in the bucket too
