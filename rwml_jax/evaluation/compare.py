"""`rwml-jax compare`: the paper's Table 1 from evaluation results.

Rows are methods (start points), columns ALFWorld ID (valid_seen), OOD (valid_unseen), their average, the τ²
domains and their average; cells are success rates, mean ± std over runs (τ²: pass^1 per run). An average
is the mean ± std over runs of the per-run mean of its columns (so it needs every column of the row).

Inputs: a run folder (its evaluations are ``<run>/eval/<model>/*.json``, one row per model named
"<run>: <model>"; an eval stage folder itself works too), an evaluation JSON (row = the evaluated policy: the
model folder's stage, or expert / gold / random), or ``NAME=PATH`` to name the rows (a folder's rows then
become "NAME: <model>" when it holds several models), or a sweep folder (`rwml-jax sweep`: one run per point)
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rwml_jax.envs import TAU2_DOMAINS
from rwml_jax.evaluation.metrics import mean_std, pct
from rwml_jax.train.stage_io import read_json
from rwml_jax.train.sweep import SWEEP_MANIFEST

ALFWORLD_COLUMNS = (("ALFWorld ID", "valid_seen"), ("ALFWorld OOD", "valid_unseen"))
COLUMNS = ("ALFWorld ID", "ALFWorld OOD", "ALFWorld avg", "τ² airline", "τ² retail", "τ² telecom", "τ² avg")


def _policy_label(settings: dict[str, Any]) -> str:
    pol = str(settings.get("policy", "?"))
    p = Path(pol)
    if p.is_absolute():  # .../<run>/<stage>/model -> <run>/<stage>
        parts = p.parts[:-1] if p.name == "model" else p.parts
        return "/".join(parts[-2:])
    return pol


def _evals(inp: str) -> list[tuple[str | None, dict[str, Any]]]:
    """[(row name or None = the policy's label, evaluation)] of one input."""
    name, sep, path = inp.partition("=")
    if not sep or os.path.exists(inp):  # a path may hold "=" itself (a sweep's point folders do)
        name, path = None, inp
    return _path_evals(name, Path(path))


def _path_evals(name: str | None, p: Path) -> list[tuple[str | None, dict[str, Any]]]:
    path = str(p)
    if p.is_dir() and (p / SWEEP_MANIFEST).is_file():
        return _sweep_evals(name, p)
    if p.is_dir():
        folder = p / "eval" if (p / "eval").is_dir() else p
        files = sorted(glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "*", "*.json")))
        files = [f for f in files if not f.endswith((".settings.json", "DONE.json", "STARTED.json"))]
        if not files:
            raise FileNotFoundError(f"{path!r}: no evaluation JSON in {folder} (run the eval stage or "
                                    f"`rwml-jax eval --json`)")
        evals = [read_json(f) for f in files]
        models = {ev.get("settings", {}).get("model_stage") for ev in evals}
        run = name or (p.name if folder != p else p.parent.name)
        if len(models) <= 1:
            return [(run, ev) for ev in evals]
        return [(f"{run}: {ev['settings'].get('model_stage')}", ev) for ev in evals]
    if not p.is_file():
        raise FileNotFoundError(f"{path!r} is neither a run folder nor an evaluation JSON")
    return [(name, read_json(p))]


def _sweep_evals(name: str | None, sweep_dir: Path) -> list[tuple[str | None, dict[str, Any]]]:
    """A sweep folder's points (`rwml-jax sweep`), each as a run folder named by its point; points without
    evaluations (failed, unfinished, or a recipe without eval) are left out."""
    out = []
    for point in read_json(sweep_dir / SWEEP_MANIFEST)["points"]:
        run = sweep_dir / point["name"]
        if glob.glob(os.path.join(run, "eval", "*", "*.json")):
            out += _path_evals(f"{name + ': ' if name else ''}{point['name']}", run)
    if not out:
        raise FileNotFoundError(f"{str(sweep_dir)!r}: no point of this sweep has evaluations yet")
    return out


def load_rows(inputs: Sequence[str]) -> list[dict[str, Any]]:
    """[{"method": name, column: {"mean", "std", "per_run"}}] in input order (JSONs of one policy merge)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for inp in inputs:
        for name, ev in _evals(inp):
            if "scores" not in ev or "settings" not in ev:
                raise ValueError(f"{inp!r} holds a JSON that is not an evaluation result (no scores/settings)")
            s = ev["settings"]
            row = rows.setdefault(name or _policy_label(s), {})
            if s["env"] == "alfworld":
                col = dict((v, k) for k, v in ALFWORLD_COLUMNS).get(s.get("split", ""))
                if col:
                    row[col] = ev["scores"]["overall"]["success_per_run"]
            else:
                for d, g in ev["scores"]["groups"].items():
                    row[f"τ² {d}"] = g["success_per_run"]
    out = []
    for name, cols in rows.items():
        r: dict[str, Any] = {"method": name}
        for c, per_run in cols.items():
            m, sd = mean_std([x for x in per_run if not math.isnan(x)])
            r[c] = {"mean": m, "std": sd, "per_run": per_run}
        for avg, parts in (("ALFWorld avg", [c for c, _ in ALFWORLD_COLUMNS]),
                           ("τ² avg", [f"τ² {d}" for d in TAU2_DOMAINS])):
            if all(p in cols for p in parts) and len({len(cols[p]) for p in parts}) == 1:
                per_run = list(np.mean(np.asarray([cols[p] for p in parts], np.float64), axis=0))
                m, sd = mean_std(per_run)
                r[avg] = {"mean": m, "std": sd, "per_run": per_run}
        out.append(r)
    return out


def compare_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: | method | ALFWorld ID | OOD | avg | τ² airline | retail | telecom | avg | (success %, mean ± std);
    columns no row has are left out."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [pct(r[c]["mean"], r[c]["std"]) if c in r else "-" for c in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
