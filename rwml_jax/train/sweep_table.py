"""A sweep's results: one row per point (its swept values, status and final metrics), as markdown
(``<sweep_dir>/table.md``), JSON (``table.json``) and a bar plot of the main metric (``sweep.png``).

Everything is read from the sweep folder alone (``sweep.json``, each point's ``status.json`` and the
DONE.json summaries of its stage folders), so the table of a partial or killed sweep can be printed at any
time. Metrics, when the recipe has the stage: filter (kept / total train triplets), rwml and wm_sft
(held-out world-model reward before / after), eval (agent success %, per split, per model when it plays
several). The main metric is the last model's first eval split, else rwml's reward after, else wm_sft's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from rwml_jax.config import STAGE_ORDER
from rwml_jax.train.plots import save_png
from rwml_jax.train.stage_io import atomic_write_json, atomic_write_text, read_json
from rwml_jax.train.sweep import SHARED, SWEEP_MANIFEST, key_labels
from rwml_jax.train.sweep_run import read_status

ERROR_CHARS = 100


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _done(sweep_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        return read_json(sweep_dir / SHARED / key / "DONE.json")
    except FileNotFoundError:
        return None


def point_metrics(summaries: dict[str, dict[str, Any]]) -> dict[str, float | str]:
    """{column: value} from the stages' DONE.json summaries ({stage: summary})."""
    out: dict[str, float | str] = {}
    f = summaries.get("filter")
    if f and "kept" in f:
        out["filter kept"] = f"{f['kept']}/{f.get('total', '?')}"
    for stage in ("rwml", "wm_sft"):
        s = summaries.get(stage)
        if s and "reward_after" in s:
            out[f"{stage} reward before"] = s["reward_before"]
            out[f"{stage} reward after"] = s["reward_after"]
    models = (summaries.get("eval") or {}).get("models") or {}
    # pipeline order (DONE.json sorts keys): base, warmstart, rwml, wm_sft; the last is the main model
    for model, res in sorted(models.items(), key=lambda kv: STAGE_ORDER.index(kv[0]) if kv[0] in STAGE_ORDER else -1):
        for split, v in res.items():
            if isinstance(v, dict) and "success_mean" in v:
                col = f"eval {split}" + (f" ({model})" if len(models) > 1 else "")
                out[col] = 100.0 * v["success_mean"]
    return out


def main_metric(columns: list[str]) -> str | None:
    evals = [c for c in columns if c.startswith("eval ")]
    if evals:  # the last model's first split
        suffix = evals[-1][evals[-1].rfind(" ("):] if evals[-1].endswith(")") else ""
        return next(c for c in evals if c.endswith(suffix)) if suffix else evals[0]
    return next((c for c in ("rwml reward after", "wm_sft reward after") if c in columns), None)


def collect_rows(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The table's data: {"keys", "labels", "columns", "main_metric", "rows": [...]} (module doc)."""
    sweep_dir = Path(sweep_dir)
    man = read_json(sweep_dir / SWEEP_MANIFEST)
    rows = []
    for p in man["points"]:
        dones = {s: _done(sweep_dir, key) for s, key in p["stages"].items()}
        rec = read_status(sweep_dir / p["name"])
        if all(dones.values()):
            status = "done"
        elif rec.get("status") == "running" and not _pid_alive(rec.get("pid")):
            status = "interrupted"
        else:
            status = rec.get("status", "pending")
        metrics = point_metrics({s: d.get("summary", {}) for s, d in dones.items() if d})
        rows.append({"point": p["name"], "values": p["values"], "status": status, "metrics": metrics,
                     "error": rec.get("error") if status != "done" else None,
                     "failed_stage": rec.get("failed_stage") if status != "done" else None,
                     "log": rec.get("log"), "wall_s": rec.get("wall_s")})
    columns = list(dict.fromkeys(c for r in rows for c in r["metrics"]))
    return {"sweep_dir": str(sweep_dir), "recipe": man["recipe"], "keys": man["keys"],
            "labels": key_labels(man["keys"]), "columns": columns, "main_metric": main_metric(columns), "rows": rows}


def _cell(v: Any, column: str = "") -> str:
    """A metric as a table cell: success % with one decimal, rewards with three."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.1f}" if column.startswith("eval ") else f"{v:.3f}"
    return str(v)


def _value(text: str) -> str:
    """A swept value's repr as a table cell: strings without their quotes."""
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def markdown(data: dict[str, Any]) -> str:
    keys, cols = data["keys"], data["columns"]
    errors = any(r["error"] for r in data["rows"])
    head = ["point", *(data["labels"][k] for k in keys), "status", *cols] + (["error"] if errors else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (1 + len(keys) + 1) + "---:|" * len(cols)
             + ("---|" if errors else "")]
    for r in data["rows"]:
        err = (r["error"] or "").replace("|", "\\|")
        err = err if len(err) <= ERROR_CHARS else err[:ERROR_CHARS - 1] + "…"
        cells = [r["point"], *(_value(r["values"][k]) if k in r["values"] else "-" for k in keys), r["status"],
                 *(_cell(r["metrics"][c], c) if c in r["metrics"] else "-" for c in cols)] + ([err] if errors else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_main_metric(path: str | os.PathLike, data: dict[str, Any]) -> Path | None:
    """Bar chart of the main metric per point (failed / unfinished points marked, no bar); None when the
    sweep has no metric yet."""
    col = data["main_metric"]
    if col is None:
        return None
    import matplotlib  # optional at import time: only the plot needs it

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4.2), dpi=120)
    try:
        xs = list(range(len(rows)))
        vals = [r["metrics"].get(col) for r in rows]
        ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], color="C0")
        for x, r, v in zip(xs, rows, vals):
            ax.annotate(r["status"] if v is None else _cell(v, col), (x, v or 0.0), ha="center", va="bottom", fontsize=8,
                        color="C3" if v is None else "black")
        ax.set_xticks(xs, [r["point"].rsplit("-", 1)[0] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(col + (" (%)" if col.startswith("eval ") else ""))
        ax.set_title(f"{data['recipe']} sweep: {col} per point")
        ax.set_ylim(0.0, 100.0 if col.startswith("eval ") else 1.0)  # success %, or a reward in [0, 1]
        ax.grid(True, axis="y", alpha=0.3)
        return save_png(fig, path)
    finally:
        plt.close(fig)


def write_table(sweep_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Write table.md, table.json and sweep.png into the sweep folder; returns (markdown, data)."""
    sweep_dir = Path(sweep_dir)
    data = collect_rows(sweep_dir)
    md = markdown(data)
    atomic_write_text(sweep_dir / "table.md", md + "\n")
    atomic_write_json(sweep_dir / "table.json", data)
    data["plot"] = str(plot_main_metric(sweep_dir / "sweep.png", data) or "")
    return md, data
