"""Metric writers: a real (tiny) SFT loop logged to tensorboard, metrics.jsonl and Weights & Biases (offline)
gives the same scalars everywhere; the W&B run continues on resume; the logging.wandb_* keys are validated.

The W&B side is read back from the offline run's own transaction log (``run-<id>.wandb``): wandb writes it
in the LevelDB log format (32 KiB blocks of CRC'd chunks) holding ``wandb_internal_pb2.Record`` protos, which
are decoded with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from rwml_jax import sharding
from rwml_jax.config import ConfigError, load_config
from rwml_jax.sampling import tiny
from rwml_jax.train.metrics_log import MetricsLogger, read_metrics, wandb_options
from rwml_jax.train.plots import plot_reward_curve
from rwml_jax.train.sft_loop import train_sft
from rwml_jax.train.writers import WANDB_RUN_FILE, WandbOptions

wandb = pytest.importorskip("wandb")


# ------------------------------------------------------------------------------------------------
# reading an offline W&B run back
# ------------------------------------------------------------------------------------------------
_BLOCK, _HEADER = 32768, 7


def _wandb_records(path: Path) -> list:
    """Every Record of an offline run file (LevelDB log format, with W&B's 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left  # zero padding up to the next block
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"bad chunk at {pos}"
        pos += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST start, MIDDLE / LAST continue
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _wandb_history(run_file: Path) -> list[dict]:
    """History rows ({key: value}) in the order they were logged."""
    rows = []
    for rec in _wandb_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            row: dict = {}
            for it in rec.history.item:  # media come as nested keys (["samples", "_type"], ...)
                keys = [it.key] if it.key else list(it.nested_key)
                node = row
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(it.value_json)
            rows.append(row)
    return rows


def _wandb_run(run_file: Path):
    return next(r.run for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "run")


def _offline_run_files(wandb_dir: Path) -> list[Path]:
    return sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))


def _tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same(a: float | None, b: float | None, rtol: float = 1e-6) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-7)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path / "wandb_dir"


def _sft_run(stage_dir: Path, logger: MetricsLogger, steps: int, tok, config, params) -> None:
    rng = np.random.default_rng(0)
    examples = [(rng.integers(5, 300, 12).tolist(), rng.integers(5, 300, 6).tolist()) for _ in range(16)]
    train_sft(stage_dir=stage_dir, mesh=sharding.make_mesh(1, 1, 1), model_config=config, init_params=lambda: params,
              examples=examples, learning_rate=1e-3, epochs=4, batch_size=4, micro_batch_size=None, warmup_steps=1,
              seed=0, pad_id=tok.pad_token_id or 0, max_steps=steps, checkpoint_every=2, keep=2, logger=logger,
              desc="sft")


def test_wandb_offline_gets_the_same_scalars_as_tensorboard_and_jsonl(tmp_path, wandb_offline):
    tok = tiny.tiny_tokenizer(tmp_path / "tok")
    config, params = tiny.tiny_model(tok, seed=0)
    stage = tmp_path / "run" / "wm_sft"
    opts = WandbOptions(mode="offline", project="rwml-test", group="tiny-sweep", name="tiny/wm_sft",
                        config={"seed": 0})
    logger = MetricsLogger(stage, wandb=opts)
    _sft_run(stage, logger, 4, tok, config, params)
    logger.scalars(4, {"reward": float("nan"), "kl": 0.25}, prefix="eval/")
    table = logger.samples_table(4, "samples", [{"action": "go to desk 1", "predicted": "You arrive", "reward": 0.5}])
    png = plot_reward_curve(stage / "reward_curve.png", {"rwml": ([0, 2, 4], [0.1, 0.3, 0.6])})
    logger.image(4, "rwml/reward_curve", png)
    logger.close()

    jsonl = read_metrics(stage)
    tb = _tb_scalars(stage / "tb")
    [run_file] = _offline_run_files(wandb_offline)
    history = _wandb_history(run_file)

    # every scalar of metrics.jsonl, at its step, in tensorboard and in W&B
    expected = {(r["step"], k): v for r in jsonl for k, v in r.items() if k not in ("step", "wall_time")}
    assert {k for _, k in expected} >= {"sft/loss", "sft/tokens_per_s", "eval/kl", "eval/reward"}
    assert sorted({s for s, k in expected if k == "sft/loss"}) == [1, 2, 3, 4]
    tb_flat = {(s, k): v for k, pts in tb.items() for s, v in pts}
    wb_flat = {(int(row["step"]), k): v for row in history for k, v in row.items()
               if k not in ("step", "_step", "_runtime", "_timestamp") and not isinstance(v, dict)}
    assert set(tb_flat) == set(expected) == set(wb_flat)
    for key, v in expected.items():
        assert _same(v, tb_flat[key]) and _same(v, wb_flat[key]), (key, v, tb_flat[key], wb_flat[key])

    # the sample table and the plot went to W&B as a table and an image, and to tensorboard / samples.jsonl
    media = {k: v for row in history for k, v in row.items() if isinstance(v, dict)}
    assert media["samples"]["_type"] == "table-file" and media["rwml/reward_curve"]["_type"] == "image-file"
    assert [json.loads(x)["text"] for x in (stage / "samples.jsonl").read_text().splitlines()] == [table]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["rwml/reward_curve"]
    assert acc.Images("rwml/reward_curve")[0].encoded_image_string == png.read_bytes()

    # the run: its id is kept in the stage folder, with the project and group given
    run = _wandb_run(run_file)
    stored = json.loads((stage / WANDB_RUN_FILE).read_text())
    assert run.run_id == stored["id"] and run.project == "rwml-test" and run.run_group == "tiny-sweep"
    assert run.display_name == "tiny/wm_sft"


def test_resumed_stage_continues_the_same_wandb_run(tmp_path, wandb_offline):
    stage = tmp_path / "rwml"
    with MetricsLogger(stage, wandb=WandbOptions(mode="offline")) as log:
        for step in range(1, 5):
            log.scalars(step, {"loss": 1.0 / step}, prefix="train/")
    with MetricsLogger(stage, resume_step=2, wandb=WandbOptions(mode="offline")) as log:  # killed after step 2's ckpt
        for step in range(3, 6):
            log.scalars(step, {"loss": 2.0 / step}, prefix="train/")
    first, second = _offline_run_files(wandb_offline)
    run_id = json.loads((stage / WANDB_RUN_FILE).read_text())["id"]
    assert _wandb_run(first).run_id == _wandb_run(second).run_id == run_id
    assert [(r["step"], r["train/loss"]) for r in _wandb_history(second)] == [(s, 2.0 / s) for s in range(3, 6)]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(stage)] == \
        [(1, 1.0), (2, 0.5)] + [(s, 2.0 / s) for s in range(3, 6)]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsLogger(tmp_path / "s") as log:
        assert log.scalars(1, {"x": 2}) == {"x": 2.0}
        log.text(1, "t", "hello")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------
# config keys
# ------------------------------------------------------------------------------------------------
def test_wandb_keys_need_logging_wandb_on():
    with pytest.raises(ConfigError) as e:
        load_config("demo_cpu", ["--config.logging.wandb_project=p", "--config.logging.wandb_mode=offline"])
    msg = str(e.value)
    assert "logging.wandb_project='p'" in msg and "logging.wandb_mode='offline'" in msg
    assert "logging.wandb is False" in msg


def test_wandb_mode_is_checked_and_options_come_from_the_config():
    with pytest.raises(ConfigError, match="logging.wandb_mode='onlin'"):
        load_config("demo_cpu", ["--config.logging.wandb=True", "--config.logging.wandb_mode=onlin"])
    c = load_config("demo_cpu", ["--config.logging.wandb=True", "--config.logging.wandb_mode=offline",
                                 "--config.logging.wandb_project=p"])
    opts = wandb_options(c, "rwml")
    assert (opts.project, opts.mode, opts.group, opts.name) == ("p", "offline", c.name, f"{c.name}/rwml")
    assert opts.config["seed"] == c.seed
    assert wandb_options(load_config("demo_cpu", []), "rwml") is None


def test_wandb_on_without_the_package_fails_validation(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        load_config("demo_cpu", ["--config.logging.wandb=True"])
