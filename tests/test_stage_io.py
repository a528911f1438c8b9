"""Stage outputs (atomic files, JSONL, DONE reuse and config-mismatch refusal), metrics logging read back
with tensorboard's own reader, progress bar, and the reward-curve plot."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rwml_jax.config import STAGE_ORDER, flatten, has_path, load_config
from rwml_jax.train.stage_io import (
    Stage,
    StageConfigMismatch,
    StageError,
    append_jsonl,
    atomic_open,
    atomic_write_json,
    read_json,
    read_jsonl,
    stage_config_keys,
    stage_deps,
    write_jsonl,
)

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Rec:
    task_id: str
    step: int
    obs: str
    reward: float = 0.0


# ---- files ---------------------------------------------------------------------------------------------
def test_jsonl_round_trip_with_dataclasses(tmp_path):
    recs = [Rec("pick/trial_1", i, f"You see a mug {i}. ünïcode", i / 10) for i in range(5)]
    assert write_jsonl(tmp_path / "a.jsonl", recs) == 5
    assert read_jsonl(tmp_path / "a.jsonl", Rec) == recs
    assert read_jsonl(tmp_path / "a.jsonl")[2] == {"task_id": "pick/trial_1", "step": 2, "obs": "You see a mug 2. ünïcode",
                                                   "reward": 0.2}
    with pytest.raises(StageError, match="missing stage output"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n{"a": 2}\n')
    with pytest.raises(StageError, match=r"bad\.jsonl:2: malformed"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "extra.jsonl").write_text('{"task_id": "t", "step": 1, "obs": "", "bogus": 1}\n')
    with pytest.raises(StageError, match="bogus"):
        read_jsonl(tmp_path / "extra.jsonl", Rec)


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(p) as f:
        f.write('{"v": 2, "half')
        raise RuntimeError("crash mid-write")
    assert read_json(p) == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_append_jsonl_survives_a_torn_last_line(tmp_path):
    p = tmp_path / "episodes.jsonl"
    append_jsonl(p, [{"i": 0}, {"i": 1}])
    with open(p, "a") as f:
        f.write('{"i": 2, "obs": "cut by a ki')  # what a kill mid-append leaves
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]
    with pytest.raises(StageError):
        read_jsonl(p, allow_partial_tail=False)
    append_jsonl(p, [{"i": 2}])  # the next append cuts the torn line first
    assert read_jsonl(p, allow_partial_tail=False) == [{"i": 0}, {"i": 1}, {"i": 2}]


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from rwml_jax.train.stage_io import write_jsonl
    def records():
        for i in range(100000):
            if i == 50:
                print("HALFWAY", flush=True)
                time.sleep(60)
            yield {"i": i, "text": "x" * 100}
    write_jsonl(sys.argv[1], records())
""")


def test_sigkill_during_write_jsonl_keeps_previous_output(tmp_path):
    p = tmp_path / "triplets.jsonl"
    write_jsonl(p, [{"i": -1}])
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(p)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert read_jsonl(p, allow_partial_tail=False) == [{"i": -1}]


# ---- stage markers -----------------------------------------------------------------------------------
def _cfg(*overrides: str):
    return load_config("demo_cpu", list(overrides))


def test_stage_done_is_reused_and_speed_knobs_do_not_count(tmp_path):
    cfg = _cfg()
    st = Stage(tmp_path, "triplets")
    assert st.status(cfg) == "fresh"
    assert st.begin(cfg) == "fresh"
    assert st.begin(cfg) == "resume"  # started, not finished (a killed run)
    write_jsonl(st.file("triplets_train.jsonl"), [{"a": 1}])
    with pytest.raises(StageError, match="missing"):
        st.finish(cfg, outputs=["triplets_val.jsonl"])
    done = st.finish(cfg, summary={"train": 1}, timings={"build_s": 0.1}, outputs=["triplets_train.jsonl"])
    assert done["summary"] == {"train": 1} and done["outputs"]["triplets_train.jsonl"] > 0
    assert Stage(tmp_path, "triplets").begin(cfg) == "done"
    # micro-batch sizes, workers, mesh, execution options, logging do not change what a stage computes
    same = _cfg("--config.env.num_workers=1", "--config.rwml.micro_batch_size=32", "--config.mesh.data=1",
                "--config.logging.log_every=5", "--config.checkpoint.every_steps=3", "--config.execution.remat=dots",
                "--config.execution.layer_loop=scan", "--config.execution.weight_format=in_out")
    assert Stage(tmp_path, "triplets").begin(same) == "done"
    # provenance: model, seed, full config, git commit of this checkout
    prov = read_json(st.done_file)["provenance"]
    assert prov["model"] == "preset:micro" and prov["seed"] == 0 and prov["config"]["name"] == "demo_cpu"
    assert prov["git"]["commit"] is None or len(prov["git"]["commit"]) == 40


def test_stage_refuses_output_of_a_different_config(tmp_path):
    cfg = _cfg()
    st = Stage(tmp_path, "rwml")
    st.begin(cfg)
    st.finish(cfg)
    with pytest.raises(StageConfigMismatch) as e:
        Stage(tmp_path, "rwml").begin(_cfg("--config.rwml.learning_rate=5e-4"))
    msg = str(e.value)
    assert f"rwml.learning_rate: {cfg.rwml.learning_rate} (stored) != 0.0005 (now)" in msg and "--force" in msg
    # an upstream stage's setting counts too (rwml reads collect's output)
    with pytest.raises(StageConfigMismatch, match=r"collect\.temperature: 1\.0 \(stored\) != 0\.7 \(now\)"):
        Stage(tmp_path, "rwml").begin(_cfg("--config.collect.temperature=0.7"))
    # a partial (resumable) output is protected the same way
    st2 = Stage(tmp_path, "filter")
    st2.begin(cfg)
    with pytest.raises(StageConfigMismatch, match=r"(?s)partial .*filter\.num_samples: 4 \(stored\) != 8 \(now\)"):
        Stage(tmp_path, "filter").begin(_cfg("--config.filter.num_samples=8"))
    # --force: the old output is moved aside, not deleted
    new = _cfg("--config.rwml.learning_rate=5e-4")
    assert Stage(tmp_path, "rwml").begin(new, force=True) == "fresh"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("rwml.replaced-")]
    assert len(aside) == 1 and (aside[0] / "DONE.json").exists()
    assert stage_deps(new, "rwml")["rwml.learning_rate"] == 5e-4


def test_recomputed_upstream_invalidates_downstream(tmp_path):
    cfg = _cfg()
    for name in ("collect", "triplets"):
        s = Stage(tmp_path, name)
        s.begin(cfg)
        s.finish(cfg)
    assert Stage(tmp_path, "triplets").begin(cfg) == "done"
    Stage(tmp_path, "collect").begin(cfg, force=True)  # recompute collect ...
    Stage(tmp_path, "collect").finish(cfg)
    with pytest.raises(StageConfigMismatch, match="upstream stage 'collect' was recomputed"):
        Stage(tmp_path, "triplets").begin(cfg)  # ... so triplets made from the old trajectories are stale


def test_stage_deps_cover_upstream_sections_only():
    cfg = _cfg()
    deps = stage_deps(cfg, "triplets")
    assert "triplets.history_length" in deps and "collect.temperature" in deps and "warmstart.steps" in deps
    assert not any(k.startswith(("rwml.", "filter.")) for k in deps)
    assert not any(k.endswith("micro_batch_size") or k.startswith("mesh.") for k in deps)
    assert "rwml.learning_rate" not in stage_deps(cfg, "wm_sft")  # wm_sft does not read rwml's output
    rwml = stage_deps(cfg, "rwml")  # a stage's ignored keys stay ignored in its downstream stages' deps
    assert "filter.num_samples" in rwml and "filter.batch_prompts" not in rwml and "embedder.batch_size" not in rwml
    assert "env.max_steps" in rwml and "env.num_workers" not in rwml and not any(k.startswith("execution.") for k in rwml)


def test_every_stage_declares_config_keys_the_recipes_have():
    cfg = load_config("rwml_alfworld")
    leaves = list(flatten(cfg))
    for stage in STAGE_ORDER:
        keys, ignored = stage_config_keys(stage)
        assert keys, stage
        for key in keys:
            assert has_path(cfg, key), (stage, key)
        for pattern in ignored:  # each ignored pattern matches a key the stage reads
            assert any(fnmatch.fnmatchcase(k, pattern) for k in leaves if any(k == p or k.startswith(p + ".")
                                                                           for p in keys)), (stage, pattern)
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        stage_config_keys("train")


# ---- metrics -----------------------------------------------------------------------------------------------
def _tb_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_metrics_logger_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rwml_jax.train.metrics_log import MetricsLogger, read_metrics, series

    with MetricsLogger(tmp_path / "rwml") as log:
        for step in range(4):
            log.scalars(step, {"reward_mean": 0.1 * step, "kl": float("nan") if step == 2 else 0.01}, prefix="rwml/")
        table = log.samples_table(3, "samples", [{"action": "go to desk 1", "predicted": "You arrive | desk",
                                                  "real": "You arrive at desk 1.", "reward": 1.0}])
    assert "\\|" in table  # cell pipes escaped
    tb = tmp_path / "rwml" / "tb"
    got = _tb_scalars(tb, "rwml/reward_mean")
    assert [s for s, _ in got] == [0, 1, 2, 3]
    assert [round(v, 6) for _, v in got] == [0.0, 0.1, 0.2, 0.3]
    acc = EventAccumulator(str(tb), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("samples")[0].tensor_proto.string_val[0].decode()
    assert "go to desk 1" in text and "| action |" in text
    recs = read_metrics(tmp_path / "rwml")
    assert series(recs, "rwml/reward_mean") == ([0, 1, 2, 3], [0.1 * s for s in range(4)])  # exact in JSONL
    assert recs[2]["rwml/kl"] is None and series(recs, "rwml/kl")[0] == [0, 1, 3]


def test_metrics_logger_resume_drops_steps_after_the_checkpoint(tmp_path):
    from rwml_jax.train.metrics_log import MetricsLogger, read_metrics, series

    with MetricsLogger(tmp_path) as log:
        for step in range(8):
            log.scalars(step, {"loss": 1.0})  # the killed run logged up to step 7
    time.sleep(0.01)
    with MetricsLogger(tmp_path, resume_step=4) as log:  # its last checkpoint was step 4
        for step in range(5, 7):
            log.scalars(step, {"loss": 2.0})
    steps, vals = series(read_metrics(tmp_path), "loss")
    assert steps == [0, 1, 2, 3, 4, 5, 6] and vals == [1.0] * 5 + [2.0] * 2
    assert len(read_metrics(tmp_path)) == 7  # no duplicate step records
    tb = _tb_scalars(tmp_path / "tb", "loss")
    assert [(s, v) for s, v in tb] == [(s, 1.0) for s in range(5)] + [(5, 2.0), (6, 2.0)]


def test_progress_bar_starts_at_resumed_position(capsys):
    from rwml_jax.train.metrics_log import format_summary, progress

    bar = progress(10, "rwml", initial=4)
    assert bar.n == 4
    bar.update(2)
    bar.set_postfix(reward=0.5)
    assert bar.n == 6 and bar.format_dict["total"] == 10
    bar.close()
    summary = format_summary("rwml done", {"steps": 10, "reward": 0.51234})
    assert summary.splitlines()[1].split() == ["steps", "10"] and "0.5123" in summary


# ---- plots -------------------------------------------------------------------------------------------------
def test_reward_curve_png(tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    from rwml_jax.train.plots import plot_reward_curve

    out = plot_reward_curve(tmp_path / "plots" / "heldout_reward.png",
                            {"rwml": [(0, 0.2), (10, 0.3), (20, 0.42)],
                             "wm_sft": ([0, 10, 20], [0.2, 0.22, 0.21])},
                            baselines={"warm start": 0.2})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600 and np.std(img[..., :3]) > 0.05  # not blank
    band = plot_reward_curve(tmp_path / "band.png", {"rwml": [(0, 0.2, 0.05), (5, 0.3, 0.04)]})
    assert band.exists()
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_reward_curve(tmp_path / "x.png", {})
    with pytest.raises(ValueError, match="2 x values but 3"):
        plot_reward_curve(tmp_path / "y.png", {"a": ([0, 1], [0.1, 0.2, 0.3])})
    assert not (tmp_path / "y.png").exists()
