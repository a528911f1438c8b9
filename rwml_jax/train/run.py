"""`rwml-jax run`: the stages of a recipe, in order, each reused when its output is already complete.

Each stage resumes by itself when killed (checkpoints and append-only progress files), so rerunning the
same command after a crash continues the run; `--force STAGE` recomputes one stage (and the stages
after it notice their upstream changed).
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from rwml_jax import storage
from rwml_jax.config import STAGE_ORDER, save_config
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.stage_io import Stage

log = logging.getLogger(__name__)


def stage_module(name: str):
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    return importlib.import_module(f"rwml_jax.train.stages.{name}")


def run_stages(config: Any, stages: tuple[str, ...] | None = None, *, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run `stages` (default: the recipe's `config.stages`) and return {stage: summary}."""
    stages = tuple(stages or config.stages)
    for s in stages:
        stage_module(s)  # unknown names fail before any work
    rt = Runtime(config)
    rt.work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, rt.work_dir / "config.json")

    summaries: dict[str, Any] = {}
    recomputed = False  # once a stage (re)computes its output, every later stage's output is stale
    for s in stages:
        t0 = time.time()
        log.info("== stage %s ==", s)
        forced = s in force or (recomputed and Stage(rt.work_dir, s).is_done())
        recomputed = recomputed or forced or not Stage(rt.work_dir, s).is_done()
        summaries[s] = stage_module(s).run(rt, force=forced)
        storage.sync(f"stage-{s}")  # every process has finished the stage before any reads its output
        log.info("stage %s finished in %.0f s: %s", s, time.time() - t0,
                 {k: v for k, v in summaries[s].items() if not isinstance(v, (list, dict))})
    return summaries
