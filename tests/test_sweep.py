"""`rwml-jax sweep`: point expansion (hyper product / zip / chain), names, validation; then real sweeps of the
demo's smoke recipe: shared upstream stages computed once, a failing point recorded while the sweep goes
on, finished points skipped on re-run, a sweep killed with SIGKILL and continued, and the results table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwml_jax.config import ConfigError, config_hash, hyper
from rwml_jax.evaluation.compare import load_rows
from rwml_jax.train.stage_io import read_json, stage_deps
from rwml_jax.train.sweep import SHARED, key_labels, plan_sweep, point_name
from rwml_jax.train.sweep_run import device_slots, error_line
from rwml_jax.train.sweep_table import collect_rows, main_metric, point_metrics

REPO = Path(__file__).resolve().parent.parent
# shrinks demo_cpu:smoke further: every point runs in well under a minute on 2 cores
TINY = ["--config.warmstart.steps=4", "--config.warmstart.num_games=6", "--config.env.num_generated_games=4",
        "--config.filter.num_samples=2", "--config.rwml.max_steps=2", "--config.rwml.eval_every=2",
        "--config.rwml.eval_size=4", "--config.eval.num_generated_games=2", "--config.eval.max_steps=2"]


def _sweep_file(tmp_path: Path, recipe: str, points: str, name: str = "sw.py") -> Path:
    f = tmp_path / name
    f.write_text(f"from rwml_jax.config import hyper\n\n\ndef get_sweep():\n    return {recipe!r}, {points}\n")
    return f


# ---- expansion, names, validation (fast) ---------------------------------------------------------------
def test_hyper_product_zip_chain():
    grid = hyper.product([hyper.sweep("config.rwml.learning_rate", [1e-4, 3e-4]), hyper.sweep("rwml.kl_coef", [0.0, 0.1])])
    assert grid == [{"rwml.learning_rate": 1e-4, "rwml.kl_coef": 0.0}, {"rwml.learning_rate": 1e-4, "rwml.kl_coef": 0.1},
                    {"rwml.learning_rate": 3e-4, "rwml.kl_coef": 0.0}, {"rwml.learning_rate": 3e-4, "rwml.kl_coef": 0.1}]
    pairs = hyper.zip([hyper.sweep("seed", [0, 1]), hyper.sweep("eval.splits", [("valid_seen",), ("valid_seen", "valid_unseen")])])
    assert pairs == [{"seed": 0, "eval.splits": ("valid_seen",)}, {"seed": 1, "eval.splits": ("valid_seen", "valid_unseen")}]
    assert hyper.chain([hyper.sweep("seed", [0]), hyper.fixed("rwml.kl_coef", 0.0, 2)]) == [
        {"seed": 0}, {"rwml.kl_coef": 0.0}, {"rwml.kl_coef": 0.0}]
    assert hyper.product([]) == [{}]
    with pytest.raises(ValueError, match="one length"):
        hyper.zip([hyper.sweep("seed", [0, 1]), hyper.sweep("rwml.kl_coef", [0.0])])
    with pytest.raises(ValueError, match="same key"):
        hyper.product([hyper.sweep("seed", [0]), hyper.sweep("config.seed", [1])])
    with pytest.raises(ValueError, match="list of values"):
        hyper.sweep("model.path", "Qwen/Qwen3-8B")


def test_point_names_are_safe_readable_and_unique():
    labels = key_labels(["rwml.learning_rate", "filter.sft.learning_rate", "model.path", "eval.splits"])
    assert labels == {"rwml.learning_rate": "rwml.learning_rate", "filter.sft.learning_rate": "sft.learning_rate",
                      "model.path": "path", "eval.splits": "splits"}
    a = point_name({"model.path": "Qwen/Qwen3-8B", "eval.splits": ("valid_seen", "valid_unseen")}, labels)
    assert a.startswith("path=Qwen_Qwen3-8B,splits=valid_seen+valid_unseen-") and "/" not in a
    b = point_name({"model.path": "Qwen_Qwen3-8B", "eval.splits": ("valid_seen", "valid_unseen")}, labels)
    c = point_name({"model.path": "Qwen/Qwen3-8B", "eval.splits": ["valid_seen", "valid_unseen"]}, labels)
    assert len({a, b, c}) == 3  # same slug, different values: the hash tells them apart
    long = point_name({"model.path": "x" * 500}, labels)
    assert len(long) < 100 and long == point_name({"model.path": "x" * 500}, labels)
    assert point_name({}, labels).startswith("base-")


def test_plan_keeps_python_values_and_shares_upstream_stage_folders(tmp_path):
    f = _sweep_file(tmp_path, "demo_cpu:smoke", """hyper.chain([
        hyper.product([hyper.sweep("rwml.learning_rate", [1e-4, 3e-4]), hyper.sweep("rwml.kl_coef", [0.0, 0.01])]),
        hyper.sweep("eval.splits", [("valid_seen", "valid_unseen")]),
        hyper.sweep("model.tokenizer", ["Qwen/Qwen3-8B"]),
        hyper.sweep("triplets.val_fraction", [0.5]),
    ])""")
    plan = plan_sweep(f, tmp_path / "sw")
    assert len(plan.points) == 7 and len({p.name for p in plan.points}) == 7
    by = {tuple(p.values.items()): p for p in plan.points}
    splits = by[(("eval.splits", ("valid_seen", "valid_unseen")),)]
    assert splits.config.eval.splits == ("valid_seen", "valid_unseen")  # a tuple stays a tuple
    tok = by[(("model.tokenizer", "Qwen/Qwen3-8B"),)]
    assert tok.config.model.tokenizer == "Qwen/Qwen3-8B" and tok.work_dir == tmp_path / "sw" / tok.name
    assert "--config.model.tokenizer=Qwen/Qwen3-8B" in tok.args
    rwml_points = plan.points[:4]
    for s in ("warmstart", "collect", "triplets", "filter"):  # only rwml.* differs: one folder per stage
        assert len({p.stages[s] for p in rwml_points}) == 1
    assert len({p.stages["rwml"] for p in rwml_points}) == 4 and len({p.stages["eval"] for p in rwml_points}) == 4
    # a point whose upstream differs gets its own folders from that stage on, and shares those before it
    val = by[(("triplets.val_fraction", 0.5),)]
    base = rwml_points[0]
    assert val.stages["collect"] == base.stages["collect"] and val.stages["triplets"] != base.stages["triplets"]
    assert val.stages["filter"] != base.stages["filter"] and val.stages["rwml"] != base.stages["rwml"]
    # the folder's hash is what the stage's DONE.json records as config_hash
    assert base.stages["rwml"] == f"rwml-{config_hash(stage_deps(base.config, 'rwml'))}"
    # a point that sets the recipe's own values shares their folders: eval.splits alone = lr 3e-4, kl 0.01
    same = by[(("rwml.learning_rate", 3e-4), ("rwml.kl_coef", 0.01))]
    assert splits.stages["rwml"] == same.stages["rwml"] and splits.stages["eval"] != same.stages["eval"]
    # the tokenizer is in the model section every stage reads: that point shares nothing
    assert not set(tok.stages.values()) & {k for p in plan.points if p is not tok for k in p.stages.values()}
    assert plan.runs_per_stage() == {"warmstart": 2, "collect": 2, "triplets": 3, "filter": 3, "rwml": 6, "policy_rl@rwml": 7, "eval": 7}


def test_invalid_points_fail_the_whole_sweep_up_front_naming_each(tmp_path):
    f = _sweep_file(tmp_path, "demo_cpu:smoke", """hyper.chain([
        hyper.sweep("rwml.learning_rate", [1e-4, -1.0]),
        hyper.sweep("rwml.learnin_rate", [1e-4]),
        hyper.sweep("rwml.group_size", [4.5]),
        hyper.sweep("work_dir", ["/tmp/x"]),
        hyper.sweep("rwml.learning_rate", [1e-4]),
    ])""")
    with pytest.raises(ConfigError) as e:
        plan_sweep(f, tmp_path / "sw")
    msg = str(e.value)
    assert "5 of 6 points are invalid; nothing was run" in msg
    assert "point 1 learning_rate=-1.0-" in msg and "rwml.learning_rate=-1.0: must be in (0.0, inf)" in msg
    assert "point 2 learnin_rate=0.0001-" in msg and "did you mean 'rwml.learning_rate'" in msg
    assert "point 3 group_size=4.5-" in msg and "rwml.group_size" in msg
    assert "point 4" in msg and "work_dir is set by the sweep" in msg
    assert "point 5" in msg and "the same values as point 0" in msg
    assert not (tmp_path / "sw").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        plan_sweep(tmp_path / "nope.py")


def test_device_slots_are_disjoint_slices():
    assert device_slots(2, ("cuda", ["0", "1", "2", "3"])) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert device_slots(3, ("cuda", ["4", "5", "6", "7"])) == [{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"},
                                                            {"CUDA_VISIBLE_DEVICES": "6"}]
    tpu = device_slots(2, ("tpu", ["0", "1", "2", "3"]))
    assert [s["TPU_VISIBLE_CHIPS"] for s in tpu] == ["0,1", "2,3"]
    assert {s["TPU_CHIPS_PER_PROCESS_BOUNDS"] for s in tpu} == {"1,2,1"}
    assert len({s["TPU_MESH_CONTROLLER_PORT"] for s in tpu}) == 2
    assert device_slots(3, ("cpu", [])) == [{}, {}, {}]
    with pytest.raises(ValueError, match="needs at least 4"):
        device_slots(4, ("cuda", ["0", "1"]))


def test_table_metrics_in_pipeline_order():
    m = point_metrics({"filter": {"kept": 3, "total": 9}, "rwml": {"reward_before": 0.1, "reward_after": 0.5},
                       "eval": {"models": {"rwml": {"valid_seen": {"success_mean": 0.5}, "policy": "x"},
                                           "warmstart": {"valid_seen": {"success_mean": 0.25}}}}})
    assert list(m) == ["filter kept", "rwml reward before", "rwml reward after", "eval valid_seen (warmstart)",
                       "eval valid_seen (rwml)"]
    assert m["filter kept"] == "3/9" and m["eval valid_seen (rwml)"] == 50.0
    assert main_metric(list(m)) == "eval valid_seen (rwml)"
    assert main_metric(["eval valid_seen", "eval valid_unseen"]) == "eval valid_seen"
    assert main_metric(["filter kept", "rwml reward after"]) == "rwml reward after"


def test_error_line_finds_the_exception():
    tail = ["Traceback (most recent call last):", '  File "x.py", line 1', "    raise ValueError('26 cannot fill')",
            "rwml_jax.envs.alfworld_data.AlfworldDataError: no loadable ALFWorld games", "exiting"]
    assert error_line(tail) == "rwml_jax.envs.alfworld_data.AlfworldDataError: no loadable ALFWorld games"


# ---- real sweeps -----------------------------------------------------------------------------------------
def _sweep(f: Path, sweep_dir: Path, *extra: str, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "rwml_jax.cli", "sweep", str(f), "--sweep-dir", str(sweep_dir), *extra, *TINY]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=env, stdout=kw["stdout"], stderr=subprocess.STDOUT, cwd=REPO)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=REPO)


def _shared_done(sweep_dir: Path, stage: str) -> list[Path]:
    return sorted((sweep_dir / SHARED).glob(f"{stage}-*/DONE.json"))


def _snapshot(paths: list[Path]) -> dict[Path, tuple[float, str]]:
    return {p: (p.stat().st_mtime, p.read_text()) for p in paths}


def test_fast_sweep_shares_upstream_records_failure_and_skips_finished_points(tmp_path):
    pytest.importorskip("alfworld", reason="needs the alfworld package")
    f = _sweep_file(tmp_path, "demo_cpu:smoke", """hyper.chain([
        hyper.sweep("triplets.val_fraction", [0.2, 0.5]),
        hyper.sweep("triplets.drop_invalid", [True]),  # the 4-step warm start's actions are all invalid: no triplet
    ])""")
    sweep_dir = tmp_path / "sw"
    out = _sweep(f, sweep_dir, "--parallel", "2", "--config.stages=warmstart,collect,triplets")
    assert out.returncode == 1, out.stdout + out.stderr  # one point failed
    assert "warmstart x1 (shared by every point), collect x1 (shared by every point), triplets x3" in out.stdout
    # the shared warm start and collect ran once; the failing point's triplets never finished
    assert len(_shared_done(sweep_dir, "warmstart")) == 1 and len(_shared_done(sweep_dir, "collect")) == 1
    assert len(_shared_done(sweep_dir, "triplets")) == 2
    data = collect_rows(sweep_dir)
    assert [r["status"] for r in data["rows"]] == ["done", "done", "failed"]
    failed = data["rows"][2]
    assert failed["failed_stage"].startswith("triplets-") and "hold no usable turn" in failed["error"]
    status = read_json(sweep_dir / failed["point"] / "status.json")
    assert status["returncode"] != 0 and any("Traceback" in line for line in status["traceback_tail"])
    table = (sweep_dir / "table.md").read_text()
    assert table.count("| val_fraction=") == 2 and "| failed |" in table and "hold no usable turn" in table
    # every point's stage folder is a link into _shared; the two good points' triplets differ as their configs do
    good = [sweep_dir / r["point"] for r in data["rows"][:2]]
    assert all((p / s).is_symlink() for p in good for s in ("warmstart", "collect", "triplets"))
    assert (good[0] / "collect").resolve() == (good[1] / "collect").resolve()
    assert [read_json(p / "triplets" / "DONE.json")["deps"]["triplets.val_fraction"] for p in good] == [0.2, 0.5]
    for p in good:  # each point's triplets were made from the collect / warmstart outputs it links
        ids = {s: read_json(p / s / "DONE.json")["run_id"] for s in ("warmstart", "collect")}
        assert read_json(p / "triplets" / "DONE.json")["upstream"] == ids

    finished = _snapshot([*(sweep_dir / SHARED).glob("*/DONE.json"), *(p / "log.txt" for p in good)])
    again = _sweep(f, sweep_dir, "--config.stages=warmstart,collect,triplets")
    assert again.returncode == 1 and again.stdout.count("finished earlier, skipped") == 2
    assert _snapshot(list(finished)) == finished  # nothing of the finished points was touched
    assert read_json(sweep_dir / failed["point"] / "status.json")["status"] == "failed"  # retried, failed again
    assert (sweep_dir / failed["point"] / "log.txt").read_text().count("\n=== ") == 2


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_four_point_smoke_sweep_killed_and_rerun(tmp_path):
    """The issue's done-when: 4 points differing only in rwml keys, one failing in its rwml stage (a batch
    larger than the filtered train set), SIGKILL mid-way, re-run, table of all 4 (~6 min on 2 cores)."""
    pytest.importorskip("alfworld", reason="needs the alfworld package")
    f = _sweep_file(tmp_path, "demo_cpu:smoke", """hyper.chain([
        hyper.sweep("rwml.learning_rate", [3e-4, 1e-3]),
        hyper.sweep("rwml.batch_prompts", [4096]),
        hyper.sweep("rwml.kl_coef", [0.1]),
    ])""")
    sweep_dir = tmp_path / "sw"
    with open(tmp_path / "first.log", "w") as log:
        proc = _sweep(f, sweep_dir, background=True, stdout=log)
        manifest = sweep_dir / "sweep.json"
        deadline = time.time() + 1200
        while time.time() < deadline and proc.poll() is None:  # kill once the first point is done and the next runs
            if manifest.exists():
                names = [p["name"] for p in json.loads(manifest.read_text())["points"]]
                st = [read_json(sweep_dir / n / "status.json") if (sweep_dir / n / "status.json").exists() else {}
                      for n in names]
                if st[0].get("status") == "done" and st[1].get("status") == "running":
                    time.sleep(5)
                    break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        child = read_json(sweep_dir / names[1] / "status.json")["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    t0 = time.time()
    while time.time() - t0 < 30 and Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split(") ")[-1][:1] != "Z":
        time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split(") ")[-1][:1] == "Z", \
        "the running point outlived the killed sweep"
    upstream = {s: _shared_done(sweep_dir, s) for s in ("warmstart", "collect", "triplets", "filter")}
    assert all(len(v) == 1 for v in upstream.values())
    first = sweep_dir / names[0]
    done_first = _snapshot([*(sweep_dir / SHARED).glob("*/DONE.json"), first / "log.txt"])

    out = _sweep(f, sweep_dir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.count("finished earlier, skipped") == 1
    assert _snapshot(list(done_first)) == done_first  # the finished point and the shared stages were not touched
    for s in ("warmstart", "collect", "triplets", "filter"):  # computed once, over both runs
        assert len(_shared_done(sweep_dir, s)) == 1
    assert len(_shared_done(sweep_dir, "rwml")) == 3 and len(_shared_done(sweep_dir, "eval")) == 3
    data = collect_rows(sweep_dir)
    assert [r["status"] for r in data["rows"]] == ["done", "done", "failed", "done"]
    bad = data["rows"][2]
    assert bad["failed_stage"].startswith("rwml-") and "cannot fill one batch of 4096" in bad["error"]
    assert all(isinstance(r["metrics"].get("rwml reward after"), float) for r in data["rows"] if r["status"] == "done")
    assert data["main_metric"] == "eval valid_seen" and (sweep_dir / "sweep.png").stat().st_size > 0
    assert out.stdout.count("| learning_rate=") + out.stdout.count("| batch_prompts=") + out.stdout.count("| kl_coef=") == 4
    assert f"rwml-jax compare {sweep_dir}" in out.stdout
    rows = load_rows([str(sweep_dir)])  # compare: one row per finished point
    assert [r["method"] for r in rows] == [r["point"] for r in data["rows"] if r["status"] == "done"]
