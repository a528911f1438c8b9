"""Run observability: tensorboard scalars and text, a metrics.jsonl, and a console progress bar with ETA.

`MetricsLogger(log_dir)` writes

    <log_dir>/tb/events.out.tfevents.*   tensorboard scalars (``rwml/reward_mean`` ...) and text (sample predictions)
    <log_dir>/metrics.jsonl              one line per `scalars` call: {"step", "wall_time", <name>: value, ...}
    <log_dir>/samples.jsonl              one line per `text` call: {"step", "wall_time", "tag", "text"}

Tensorboard files are written with the ``tensorboard`` package's own event writer (no TensorFlow, no
PyTorch). On resume (``resume_step=k``) the JSONL records after step k are dropped and tensorboard is told
to purge its events after step k, so a run killed and resumed shows one clean curve.

Values may be Python numbers, numpy or JAX scalars; converting a JAX array to a float waits for it, so log
values the loop has already fetched (e.g. the metrics dict returned by a jitted step, once per log_every).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from rwml_jax.train.stage_io import atomic_write_text, to_json


def _to_float(v: Any) -> float:
    if hasattr(v, "item"):
        v = v.item()
    return float(v)


class _TBWriter:
    """Minimal tensorboard event writer (scalars + text) on top of tensorboard's EventFileWriter."""

    def __init__(self, logdir: Path) -> None:
        from tensorboard.compat.proto import (
            event_pb2,
            summary_pb2,
            tensor_pb2,
            tensor_shape_pb2,
            types_pb2,
        )
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = (event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2)
        self._text_md = text_metadata.create_summary_metadata(display_name=None, description=None)
        logdir.mkdir(parents=True, exist_ok=True)
        self._w = EventFileWriter(str(logdir), max_queue_size=100, flush_secs=30,
                                  filename_suffix=f".{socket.gethostname()}.{os.getpid()}")

    def _event(self, step: int, summary: Any) -> None:
        event_pb2 = self._pb[0]
        self._w.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary_pb2 = self._pb[1]
        vals = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        self._event(step, summary_pb2.Summary(value=vals))

    def text(self, step: int, tag: str, text: str) -> None:
        _, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2 = self._pb
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[]))
        value = summary_pb2.Summary.Value(tag=tag, metadata=self._text_md, tensor=tensor)
        self._event(step, summary_pb2.Summary(value=[value]))

    def restart_at(self, step: int) -> None:
        """Tell tensorboard that events at steps >= `step` from an earlier (killed) session are void."""
        event_pb2 = self._pb[0]
        self._w.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def _truncate_jsonl_after(path: Path, step: int) -> int:
    """Drop records with "step" > step (atomic rewrite); returns how many were dropped."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                dropped += 1  # a line cut by a kill
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if rec.get("step", -1) > step:
                dropped += 1
            else:
                keep.append(line)
    if dropped:
        atomic_write_text(path, "".join(keep))
    return dropped


class MetricsLogger:
    """Scalars and texts to tensorboard + JSONL. Use as a context manager or call `close`."""

    def __init__(self, log_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.log_dir / "metrics.jsonl"
        self.samples_path = self.log_dir / "samples.jsonl"
        if resume_step is not None:
            _truncate_jsonl_after(self.metrics_path, resume_step)
            _truncate_jsonl_after(self.samples_path, resume_step)
        self._tb = _TBWriter(self.log_dir / "tb") if tensorboard else None
        if self._tb is not None and resume_step is not None:
            self._tb.restart_at(resume_step + 1)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        self._samples = open(self.samples_path, "a", encoding="utf-8")  # noqa: SIM115

    @property
    def tb_dir(self) -> Path | None:
        return self.log_dir / "tb" if self._tb is not None else None

    def scalars(self, step: int, values: Mapping[str, Any], *, prefix: str = "") -> dict[str, float | None]:
        """Log {name: number} at `step`; names get `prefix` ("rwml/" ...). Non-finite values are written as
        NaN to tensorboard and null to JSONL. Returns the logged floats."""
        vals = {f"{prefix}{k}": _to_float(v) for k, v in values.items()}
        if self._tb is not None:
            self._tb.scalars(step, vals)
        rec: dict[str, Any] = {"step": int(step), "wall_time": round(time.time(), 3)}
        rec.update({k: (v if math.isfinite(v) else None) for k, v in vals.items()})
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        return {k: rec[k] for k in vals}

    def text(self, step: int, tag: str, text: str) -> None:
        """Log a (markdown) text at `step`, e.g. sample predictions next to the real next state."""
        if self._tb is not None:
            self._tb.text(step, tag, text)
        self._samples.write(to_json({"step": int(step), "wall_time": round(time.time(), 3), "tag": tag,
                                     "text": text}) + "\n")
        self._samples.flush()

    def samples_table(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]], max_chars: int = 400) -> str:
        """Log rows (e.g. {"action", "predicted", "real", "reward"}) as one markdown table; returns it."""
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
        self.text(step, tag, table)
        return table

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        self._metrics.flush()
        self._samples.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for f in (self._metrics, self._samples):
            if not f.closed:
                f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a folder holding one is accepted); a line cut by a kill is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    out = []
    with open(p, encoding="utf-8") as f:
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
    redraws at most every 30 s, so log files stay short. Set RWML_NO_PROGRESS=1 to hide it.
    """
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, leave=leave, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, smoothing=0.1, file=sys.stderr,
                disable=os.environ.get("RWML_NO_PROGRESS") == "1")


def format_summary(title: str, values: Mapping[str, Any]) -> str:
    """A short aligned text block for the end of a stage: "title\n  key ..... value"."""
    width = max((len(k) for k in values), default=0)
    lines = [title]
    for k, v in values.items():
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        lines.append(f"  {k.ljust(width)}  {s}")
    return "\n".join(lines)
