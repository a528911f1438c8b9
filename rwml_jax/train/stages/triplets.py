"""Stage 2, `triplets`: ⟨task + last H (state, action) pairs, action, realised next state⟩ from every turn.

Optional drop of invalid actions, τ² tool responses masked to their schema, and the validation / train
split. Output: `triplets/train.jsonl`, `triplets/val.jsonl`.
"""

from __future__ import annotations

from typing import Any

from rwml_jax.agent.trajectory import Trajectory
from rwml_jax.rwml.triplets import (
    Triplet,
    build_triplets,
    split_triplets,
    triplet_stats,
)
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.stage_io import Stage, read_jsonl, write_jsonl

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("triplets",)


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    c = rt.config
    t = c.triplets
    stage = Stage(rt.work_dir, "triplets")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    trajectories = [Trajectory.from_dict(d) for d in read_jsonl(rt.work_dir / "collect" / "trajectories.jsonl")]
    triplets = build_triplets(trajectories, history_length=t.history_length, drop_invalid=t.drop_invalid,
                              mask_tool_schema=t.mask_tool_schema, ask_task_status=t.ask_task_status)
    if not triplets:
        raise ValueError("the collected trajectories hold no usable turn (every action invalid and dropped?)")
    train, val = split_triplets(triplets, t.val_fraction, seed=t.seed, by=t.split_by)
    write_jsonl(stage.file("train.jsonl"), [x.to_dict() for x in train])
    write_jsonl(stage.file("val.jsonl"), [x.to_dict() for x in val])
    summary = {"trajectories": len(trajectories), "train": len(train), "val": len(val), **triplet_stats(triplets)}
    stage.finish(c, summary=summary, outputs=["train.jsonl", "val.jsonl"])
    return summary


def load_split(rt: Runtime, name: str):
    """The `train` / `val` triplets of this run (Triplet objects)."""

    return [Triplet.from_dict(d) for d in read_jsonl(rt.work_dir / "triplets" / f"{name}.jsonl")]
