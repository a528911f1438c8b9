"""The pipeline on 2 JAX processes x 4 CPU devices (jax.distributed on loopback, gloo collectives, the
tests/test_multihost.py set-up) against 1 process with 8 devices, through `rwml-jax run`'s own code
(tests/pipeline_worker.py): every stage completes, both processes hold the same parameters whenever a
stage saves a model, only process 0 writes the run's files, and the results equal the 1-process run's.

Fast: the warm-start stage alone. Slow: the demo's smoke variant end to end (every stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_multihost import free_port

pytest.importorskip("alfworld", reason="needs the alfworld package")

WORKER = Path(__file__).resolve().parent / "pipeline_worker.py"
WARMSTART = ["--config.warmstart.num_games=4", "--config.warmstart.steps=4", "--config.checkpoint.every_steps=2",
             "--config.env.num_workers=1"]
# the demo's smoke variant, smaller still (as tests/test_pipeline_resume.py), every stage
SMOKE = ["--config.warmstart.steps=6", "--config.warmstart.num_games=8", "--config.env.num_generated_games=6",
         "--config.rwml.max_steps=4", "--config.checkpoint.every_steps=2", "--config.rwml.eval_every=2",
         "--config.filter.num_samples=2", "--config.rwml.eval_size=4", "--config.eval.num_generated_games=2",
         "--config.eval.runs=1", "--config.env.num_workers=1"]


def _env(tmp_path: Path, tag: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RWML_CACHE_DIR=str(tmp_path / f"cache-{tag}"), HF_HUB_OFFLINE="1")
    for var in ("RWML_COORDINATOR", "RWML_NUM_PROCESSES", "RWML_PROCESS_ID", "RWML_DISTRIBUTED", "XLA_FLAGS"):
        env.pop(var, None)
    return env


def run_both(tmp_path: Path, overrides: list[str], stages: list[str] | None, timeout: int):
    """(multi: [p0, p1] results, single: p0 result, work dirs); each result is (params, record)."""
    coordinator = f"127.0.0.1:{free_port()}"
    stage_args = ["--stages", *stages] if stages else []

    def start(tag: str, devices: int, extra: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(WORKER), "--devices", str(devices), "--out", str(tmp_path / tag),
             "--work", str(tmp_path / f"work-{tag}"), *stage_args, *extra, "--", *overrides],
            env=_env(tmp_path, tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [start("multi", 4, ["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)])
             for i in range(2)]
    procs.append(start("single", 8, []))
    for p in procs:
        log, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, log[-6000:]

    def load(tag: str, i: int):
        with np.load(tmp_path / f"{tag}.p{i}.npz") as z:
            params = dict(z)
        return params, json.loads((tmp_path / f"{tag}.p{i}.json").read_text())

    return [load("multi", 0), load("multi", 1)], load("single", 0)


def check(tmp_path: Path, multi, single, stages: list[str]) -> None:
    (p0, r0), (p1, r1) = multi
    ps, rs = single
    assert (r0["processes"], r1["processes"], rs["processes"]) == (2, 2, 1)
    assert r0["devices"] == rs["devices"] == 8
    assert list(r0["summaries"]) == list(r1["summaries"]) == list(rs["summaries"]) == stages
    work = tmp_path / "work-multi"
    for s in stages:
        for marker in ("STARTED.json", "DONE.json"):
            prov = json.loads((work / s / marker).read_text())["provenance"]
            assert prov["process"] == 0, (s, marker)

    # the same parameters on both processes, and the 1-process run's up to float rounding: gloo's
    # all-reduce sums in another order than one process's; Adam divides each gradient component by its own
    # magnitude, so where a component is ~0 a rounding-sized difference can move that one parameter by up
    # to ~lr per step (seen: 1 of 32768 elements of the filter model, 4e-3 relative, 1e-3 of its tensor's scale)
    assert p0.keys() == p1.keys() == ps.keys() and len(p0) > 5
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
        diff = np.abs(p0[k] - ps[k])
        assert diff.max() <= 3e-3 * np.abs(ps[k]).max(), (k, diff.max())
        assert (diff > 1e-5 + 1e-4 * np.abs(ps[k])).mean() <= 1e-3, (k, (diff > 1e-5).mean())

    # only process 0 wrote the run's files (process 1 opened none of them for writing). In a multi-host
    # checkpoint each process writes its own array shards and their metadata (orbax: ocdbt.process_<i>,
    # array_metadatas/process_<i>); those are process 1's only files
    assert r0["writes"], "the audit hook saw no writes at all"
    own = [w for w in r1["writes"] if "/checkpoints/" in w[1] and w[1].endswith("process_1")]
    assert [w for w in r1["writes"] if w not in own] == [], r1["writes"][:20]
    # each metric record once (process 1 did not log): no two records with the same step and names
    for s in stages:
        f = work / s / "metrics.jsonl"
        if f.exists():
            keys = [(r["step"], tuple(sorted(r))) for r in map(json.loads, f.read_text().splitlines())]
            assert len(keys) == len(set(keys)), (s, keys)


@pytest.mark.multiprocess
@pytest.mark.timeout(1800)
def test_warmstart_on_two_processes(tmp_path):
    multi, single = run_both(tmp_path, WARMSTART, ["warmstart"], timeout=1500)
    check(tmp_path, multi, single, ["warmstart"])
    for tag in ("multi", "single"):
        assert (tmp_path / f"work-{tag}" / "warmstart" / "model" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(5400)
def test_smoke_demo_on_two_processes(tmp_path):
    from rwml_jax.config import load_config

    stages = list(load_config("demo_cpu:smoke").stages)
    multi, single = run_both(tmp_path, SMOKE, None, timeout=5000)
    check(tmp_path, multi, single, stages)
    # the same episodes, triplets, rewards, kept set, RWML batches and evaluations as the 1-process run
    # (up to the paths inside the records: each run's own work dir, and a host's own copy of the games)
    for rel in ("collect/trajectories.jsonl", "triplets/train.jsonl", "triplets/val.jsonl", "filter/rewards.jsonl",
                "filter/kept.jsonl", "rwml/batches.jsonl", "rwml/eval.jsonl"):
        a, b = ([_without_paths(json.loads(x)) for x in (tmp_path / f"work-{t}" / rel).read_text().splitlines()]
                for t in ("multi", "single"))
        assert a == b and a, rel


def _without_paths(record):
    """A JSON record without the fields that hold file paths (provenance, game files)."""
    if isinstance(record, dict):
        return {k: _without_paths(v) for k, v in record.items() if k not in ("provenance", "gamefile")}
    if isinstance(record, list):
        return [_without_paths(v) for v in record]
    return record
