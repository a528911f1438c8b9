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
from rwml_jax.config import save_config
from rwml_jax.config.stages import check_stage, stage_kind
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.stage_io import Stage, upstream_stages_of

log = logging.getLogger(__name__)


def stage_module(name: str):
    """The module of stage `name` (an instance "policy_rl@rwml" runs the policy_rl module)."""
    return importlib.import_module(f"rwml_jax.train.stages.{stage_kind(check_stage(name))}")


def run_stages(config: Any, stages: tuple[str, ...] | None = None, *, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run `stages` (default: the recipe's `config.stages`) and return {stage: summary}."""
    stages = tuple(stages or config.stages)
    for s in stages:
        stage_module(s)  # unknown names fail before any work
    rt = Runtime(config)
    rt.work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, rt.work_dir / "config.json")

    summaries: dict[str, Any] = {}
    recomputed: set[str] = set()  # once a stage (re)computes its output, the outputs that read it are stale
    for s in stages:
        t0 = time.time()
        log.info("== stage %s ==", s)
        stale = bool(recomputed.intersection(upstream_stages_of(config, s)))
        forced = s in force or stage_kind(s) in force or (stale and Stage(rt.work_dir, s).is_done())
        if forced or not Stage(rt.work_dir, s).is_done():
            recomputed.add(s)
        kw = {"name": s} if stage_kind(s) == "policy_rl" else {}  # the instance of an instanced stage
        summaries[s] = stage_module(s).run(rt, force=forced, **kw)
        storage.sync(f"stage-{s}")  # every process has finished the stage before any reads its output
        log.info("stage %s finished in %.0f s: %s", s, time.time() - t0,
                 {k: v for k, v in summaries[s].items() if not isinstance(v, (list, dict))})
    return summaries
