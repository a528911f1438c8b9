"""Metric writers: one small interface, three back ends, all fed the same records by `MetricsLogger`.

A writer has

    scalars(step, values)          {name: float} at an optimiser step (NaN / inf allowed)
    text(step, tag, text)          a (markdown) text, e.g. sample predictions
    table(step, tag, rows, markdown)  rows of {column: value}; `markdown` is the same table rendered as text
    image(step, tag, path)         a PNG file (e.g. the reward curve the rwml stage plots)
    flush(), close()

Back ends:

* `TensorboardWriter` ``<log_dir>/tb/events.out.tfevents.*``: scalars, texts (tables as markdown text) and
  PNG images, written with the ``tensorboard`` package's own event writer (no TensorFlow, no PyTorch).
* `JsonlWriter` ``<log_dir>/metrics.jsonl`` (one line per `scalars` call: {"step", "wall_time", name: value};
  non-finite values as null) and ``<log_dir>/samples.jsonl`` (one line per text or table:
  {"step", "wall_time", "tag", "text"}). Images are not copied: the PNG already lies in the stage folder.
* `WandbWriter` (optional extra ``wandb``): scalars as history rows with a ``step`` column that every
  metric is plotted against, tables as ``wandb.Table``, texts as one-cell tables, images as
  ``wandb.Image``. The run id is kept in ``<log_dir>/wandb_run.json`` so a resumed stage continues the same
  run (offline mode too; ``wandb sync <dir>/wandb/offline-run-*`` uploads an offline run later).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rwml_jax import storage
from rwml_jax.train.stage_io import atomic_write_json, atomic_write_text, read_json, to_json

WANDB_RUN_FILE = "wandb_run.json"


class Writer(Protocol):
    """What `MetricsLogger` feeds every back end (see the module docstring)."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None: ...

    def table(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]], markdown: str) -> None: ...

    def image(self, step: int, tag: str, path: Path) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------
# tensorboard
# ------------------------------------------------------------------------------------------------
def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    return struct.unpack(">II", data[16:24])


class TensorboardWriter:
    """Scalars, texts and PNG images as tensorboard events in `logdir` (tensorboard's EventFileWriter)."""

    def __init__(self, logdir: Path, *, resume_step: int | None = None) -> None:
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
        # tensorboard writes local files (and s3) only: for a bucket, events go to a local folder that
        # close() uploads
        self._remote = logdir if storage.is_remote(logdir) else None
        if self._remote is not None:
            logdir = Path(tempfile.mkdtemp(prefix="rwml-tb-"))
        logdir.mkdir(parents=True, exist_ok=True)
        self._logdir = logdir
        self._w = EventFileWriter(str(logdir), max_queue_size=100, flush_secs=30,
                                  filename_suffix=f".{socket.gethostname()}.{os.getpid()}")
        if resume_step is not None:
            self._restart_at(resume_step + 1)

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

    def table(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]], markdown: str) -> None:
        self.text(step, tag, markdown)

    def image(self, step: int, tag: str, path: Path) -> None:
        summary_pb2 = self._pb[1]
        data = storage.as_path(path).read_bytes()
        width, height = _png_size(data)
        img = summary_pb2.Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
        self._event(step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=img)]))

    def _restart_at(self, step: int) -> None:
        """Tell tensorboard that events at steps >= `step` from an earlier (killed) session are void."""
        event_pb2 = self._pb[0]
        self._w.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()
        if self._remote is not None:
            storage.upload_dir(self._logdir, self._remote)


# ------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------
def _truncate_jsonl_after(path: Path, step: int) -> int:
    """Drop records with "step" > step (atomic rewrite); returns how many were dropped."""
    path = storage.as_path(path)
    if not path.exists():
        return 0
    keep, dropped = [], 0
    with path.open(encoding="utf-8") as f:
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


_OPEN_APPENDERS: weakref.WeakSet = weakref.WeakSet()


def flush_pending() -> None:
    """Write out every bucket-backed log's buffered records (called before each checkpoint save, so the
    logs hold every record up to the step a resumed run restarts from)."""
    for f in list(_OPEN_APPENDERS):
        f.flush(force=True)


class _ObjectAppender:
    """An append-mode text file over an object in a bucket (which has no append): lines are buffered and
    the object rewritten whole at most every `every_s` seconds (GCS allows about one write per second to
    an object), before each checkpoint (`flush_pending`) and on close."""

    def __init__(self, path: Any, every_s: float = 10.0) -> None:
        self.path, self.every_s, self.closed = path, every_s, False
        self._buf: list[str] = []
        self._last = time.time()
        _OPEN_APPENDERS.add(self)

    def write(self, text: str) -> None:
        self._buf.append(text)

    def flush(self, force: bool = False) -> None:
        if self._buf and (force or time.time() - self._last >= self.every_s):
            old = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            self.path.write_text(old + "".join(self._buf), encoding="utf-8")
            self._buf, self._last = [], time.time()

    def close(self) -> None:
        self.flush(force=True)
        self.closed = True


def _append_file(path: Any) -> Any:
    if storage.is_remote(path):
        return _ObjectAppender(path)
    return open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed by the writer's close())


class JsonlWriter:
    """metrics.jsonl + samples.jsonl in `log_dir`; on resume the records after `resume_step` are dropped."""

    def __init__(self, log_dir: Path, *, resume_step: int | None = None) -> None:
        self.metrics_path = log_dir / "metrics.jsonl"
        self.samples_path = log_dir / "samples.jsonl"
        if resume_step is not None:
            _truncate_jsonl_after(self.metrics_path, resume_step)
            _truncate_jsonl_after(self.samples_path, resume_step)
        self._metrics = _append_file(self.metrics_path)
        self._samples = _append_file(self.samples_path)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        rec: dict[str, Any] = {"step": int(step), "wall_time": round(time.time(), 3)}
        rec.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self._samples.write(to_json({"step": int(step), "wall_time": round(time.time(), 3), "tag": tag,
                                     "text": text}) + "\n")
        self._samples.flush()

    def table(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]], markdown: str) -> None:
        self.text(step, tag, markdown)

    def image(self, step: int, tag: str, path: Path) -> None:
        """Nothing to add: the PNG itself is in the stage folder."""

    def flush(self) -> None:
        self._metrics.flush()
        self._samples.flush()

    def close(self) -> None:
        for f in (self._metrics, self._samples):
            if not f.closed:
                f.close()


# ------------------------------------------------------------------------------------------------
# Weights & Biases
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WandbOptions:
    """Where a stage's W&B run goes (the config's ``logging.wandb_*`` keys).

    project: W&B project ("" = "rwml-jax"). entity: user or team ("" = the account's default).
    mode: "online" | "offline" | "disabled" | "" (wandb's own: WANDB_MODE, else online).
    group: runs of one recipe or sweep are grouped under it. name: the run's display name
    ("<recipe>/<stage>"). config: the run's config (shown in W&B's table).
    """

    project: str = ""
    entity: str = ""
    mode: str = ""
    group: str = ""
    name: str = ""
    config: Mapping[str, Any] | None = None


class WandbWriter:
    """Everything as one W&B run per stage folder; the run id is kept in `<log_dir>/wandb_run.json`."""

    def __init__(self, log_dir: Path, options: WandbOptions) -> None:
        import wandb  # optional extra: imported only when the W&B writer is on

        self._wandb = wandb
        id_file = log_dir / WANDB_RUN_FILE
        stored = read_json(id_file) if id_file.exists() else {}
        run_id = stored.get("id") or uuid.uuid4().hex[:12]
        kw: dict[str, Any] = dict(
            project=options.project or "rwml-jax", entity=options.entity or None, group=options.group or None,
            name=options.name or None, id=run_id, resume="allow", config=dict(options.config or {}),
            # WANDB_DIR wins; else the run's files go next to the stage's other logs
            dir=os.environ.get("WANDB_DIR") or os.fspath(log_dir), reinit="create_new",
        )
        if options.mode:
            kw["mode"] = options.mode
        self.run = wandb.init(**kw)
        if not stored:
            atomic_write_json(id_file, {"id": run_id, "project": kw["project"], "entity": options.entity,
                                        "group": options.group, "name": options.name})
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({**values, "step": int(step)})

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self._wandb.Table(columns=["text"], data=[[text]]), "step": int(step)})

    def table(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]], markdown: str) -> None:
        cols = list(rows[0].keys())
        data = [[r.get(c) if isinstance(r.get(c), (int, float, str, bool)) else str(r.get(c)) for c in cols]
                for r in rows]
        self.run.log({tag: self._wandb.Table(columns=cols, data=data), "step": int(step)})

    def image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({tag: self._wandb.Image(os.fspath(path)), "step": int(step)})

    def flush(self) -> None:
        """W&B streams records itself."""

    def close(self) -> None:
        self.run.finish()
