"""Run observability: one `MetricsLogger` feeding every metric writer, and a console progress bar with ETA.

`MetricsLogger(log_dir)` writes (see `rwml_jax.train.writers` for the writer interface)

    <log_dir>/tb/events.out.tfevents.*   tensorboard scalars (``rwml/reward_mean`` ...), text (sample predictions), images
    <log_dir>/metrics.jsonl              one line per `scalars` call: {"step", "wall_time", <name>: value, ...}
    <log_dir>/samples.jsonl              one line per `text` / `samples_table` call: {"step", "wall_time", "tag", "text"}
    <log_dir>/wandb_run.json, wandb/     with the optional Weights & Biases writer (``logging.wandb = True``)

Tensorboard files are written with the ``tensorboard`` package's own event writer (no TensorFlow, no
PyTorch). On resume (``resume_step=k``) the JSONL records after step k are dropped and tensorboard is told
to purge its events after step k, so a run killed and resumed shows one clean curve; W&B continues the
same run (its id is kept in the stage folder).

Values may be Python numbers, numpy or JAX scalars; converting a JAX array to a float waits for it, so log
values the loop has already fetched (e.g. the metrics dict returned by a jitted step, once per log_every).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from rwml_jax import storage
from rwml_jax.config import config_to_dict
from rwml_jax.train.writers import JsonlWriter, TensorboardWriter, WandbOptions, WandbWriter, Writer


def _to_float(v: Any) -> float:
    if hasattr(v, "item"):
        v = v.item()
    return float(v)


def wandb_options(config: Any, stage: str) -> WandbOptions | None:
    """The W&B writer's options from a loaded recipe (`config.logging`), or None when it is off."""
    lg = config.logging
    if not lg.get("wandb", False):
        return None
    return WandbOptions(project=lg.wandb_project, entity=lg.wandb_entity, mode=lg.wandb_mode,
                        group=lg.wandb_group or config.name, name=f"{config.name}/{stage}",
                        config=config_to_dict(config))


class MetricsLogger:
    """Scalars, texts, tables and images to every writer. Use as a context manager or call `close`.

    Writers: JSONL (always), tensorboard (`tensorboard=True`), Weights & Biases (`wandb=WandbOptions`).
    Only process 0 of a multi-host run writes; the others keep the same calls as no-ops.
    """

    def __init__(self, log_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None,
                 wandb: WandbOptions | None = None) -> None:
        self.log_dir = storage.as_path(log_dir)
        self.metrics_path = self.log_dir / "metrics.jsonl"
        self.samples_path = self.log_dir / "samples.jsonl"
        self.writers: list[Writer] = []
        self._tensorboard = tensorboard
        if not storage.is_writer():
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writers.append(JsonlWriter(self.log_dir, resume_step=resume_step))
        if tensorboard:
            self.writers.append(TensorboardWriter(self.log_dir / "tb", resume_step=resume_step))
        if wandb is not None:
            self.writers.append(WandbWriter(self.log_dir, wandb))

    @classmethod
    def for_stage(cls, stage_dir: str | os.PathLike, config: Any, *, resume_step: int | None = None) -> MetricsLogger:
        """The logger of a pipeline stage folder with the writers `config.logging` asks for."""
        stage_dir = storage.as_path(stage_dir)
        return cls(stage_dir, tensorboard=config.logging.tensorboard, resume_step=resume_step,
                   wandb=wandb_options(config, stage_dir.name))

    @property
    def tb_dir(self) -> Path | None:
        return self.log_dir / "tb" if self._tensorboard else None

    def scalars(self, step: int, values: Mapping[str, Any], *, prefix: str = "") -> dict[str, float | None]:
        """Log {name: number} at `step`; names get `prefix` ("rwml/" ...). Non-finite values are written as
        NaN to tensorboard and null to JSONL. Returns the logged floats (None for non-finite ones)."""
        vals = {f"{prefix}{k}": _to_float(v) for k, v in values.items()}
        for w in self.writers:
            w.scalars(step, vals)
        return {k: (v if math.isfinite(v) else None) for k, v in vals.items()}

    def text(self, step: int, tag: str, text: str) -> None:
        """Log a (markdown) text at `step`, e.g. sample predictions next to the real next state."""
        for w in self.writers:
            w.text(step, tag, text)

    def samples_table(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]], max_chars: int = 400) -> str:
        """Log rows (e.g. {"action", "predicted", "real", "reward"}) as one table (markdown text to
        tensorboard and samples.jsonl, a table to W&B); returns the markdown."""
        if not rows:
            return ""
        cols = list(rows[0].keys())

        def cell(v: Any) -> str:
            s = v if isinstance(v, str) else (f"{v:.3g}" if isinstance(v, float) else str(v))
            s = s.replace("|", "\\|").replace("\n", " ")
            return s if len(s) <= max_chars else s[: max_chars - 1] + "…"

        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
        table = "\n".join(lines)
        for w in self.writers:
            w.table(step, tag, rows, table)
        return table

    def image(self, step: int, tag: str, path: str | os.PathLike) -> None:
        """Log a PNG (e.g. a plot the stage wrote) at `step`."""
        for w in self.writers:
            w.image(step, tag, storage.as_path(path))

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            w.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a folder holding one is accepted); a line cut by a kill is skipped."""
    p = storage.as_path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    out = []
    with p.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                out.append(json.loads(line))
    return out


def series(records: Sequence[Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric across records (records without it, or null, are skipped; the last
    record of a step wins)."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get(name) is not None:
            by_step[int(r["step"])] = float(r[name])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def progress(total: int | None, desc: str, *, initial: int = 0, unit: str = "step", leave: bool = True) -> Any:
    """A tqdm progress bar with rate and ETA on stderr: ``bar.update(n)``, ``bar.set_postfix(reward=...)``.

    `initial` makes a resumed stage show its true position. When stderr is not a terminal (logs, CI) the bar
    redraws at most every 30 s, so log files stay short. Set RWML_NO_PROGRESS=1 to hide it. Only the
    writer process (process 0) shows it.
    """
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, leave=leave, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, smoothing=0.1, file=sys.stderr,
                disable=os.environ.get("RWML_NO_PROGRESS") == "1" or not storage.is_writer())


def format_summary(title: str, values: Mapping[str, Any]) -> str:
    """A short aligned text block for the end of a stage: "title\n  key ..... value"."""
    width = max((len(k) for k in values), default=0)
    lines = [title]
    for k, v in values.items():
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        lines.append(f"  {k.ljust(width)}  {s}")
    return "\n".join(lines)
