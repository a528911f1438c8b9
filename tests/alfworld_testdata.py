"""Shared ALFWorld test data: games from the project's generator (always available) and the offline copy of
the official games (when present), in the folder layouts the tests need.

Tests that read games are parametrized over a data source, with the list built at collection time:
"generated" always, "real" only where the offline data exists (../shared/data/alfworld beside the
repository, or RWML_ALFWORLD_SHARED). A fresh clone therefore runs every such test on generated games and
skips none for missing data; where the data is present (CI) the real-data variants run too.

Helpers (not fixtures) so several test modules can share one generated set per test session.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from rwml_jax.envs.alfworld_data import TASK_TYPES, GameRef, list_games

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/alfworld next to the repository (override with RWML_ALFWORLD_SHARED)
SHARED = Path(os.environ.get("RWML_ALFWORLD_SHARED", REPO.parent / "shared" / "data" / "alfworld"))
TRAIN_ARCHIVE = SHARED / "json_2.1.1_train.tar.xz"

# The data sources a test can run on here: "real" only where its files exist (decided at collection time,
# so without the data the real variants are not generated rather than skipped).
DATA_SOURCES: list[str] = ["generated"] + (["real"] if (SHARED / "valid_seen").is_dir() else [])
TRAIN_SOURCES: list[str] = ["generated"] + (["real"] if TRAIN_ARCHIVE.is_file() else [])

REAL_VALID_SEEN_GAMES = 140  # the offline valid_seen copy (its README: the 140 in-distribution games)
# Games of the offline copy the tests single out, by task-id prefix (small ones, so the tests stay quick).
REAL_PREFERRED = {
    "look_at_obj_in_light": "look_at_obj_in_light-AlarmClock-None-DeskLamp-323/trial_T20190909_044715_250790",
    "pick_and_place_simple": "pick_and_place_simple-Book-None-SideTable-329/trial_T20190908_050633_745514",
    "pick_clean_then_place_in_recep": "pick_clean_then_place_in_recep-SoapBar-None-Toilet-428/",
}
GENERATED_PER_TYPE = 2  # generated games of each task type in a generated split

_cache: dict[str, Path] = {}


def require_alfworld() -> None:
    pytest.importorskip("textworld", reason="the ALFWorld tests need the alfworld package (pip install alfworld)")
    pytest.importorskip("alfworld", reason="the ALFWorld tests need the alfworld package (pip install alfworld)")


@dataclasses.dataclass(frozen=True)
class ValidSeen:
    """A data folder holding valid_seen/<task>/<trial>/game.tw-pddl, and what tests may assert about it."""

    source: str  # "generated" | "real"
    root: Path  # the data folder (holds valid_seen/)
    num_games: int  # playable games in valid_seen
    preferred: dict[str, str]  # task type -> task-id prefix of the game `game` picks (default: the first)

    def game(self, task_type: str) -> GameRef:
        """The game of `task_type` tests single out."""
        prefix = self.preferred.get(task_type, "")
        return next(g for g in list_games(self.root, "valid_seen", task_types=[task_type])
                    if g.task_id.startswith(prefix))


def _tempdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, True)
    return d


def _generate(seed: int, num: int, *layout: str) -> Path:
    """`num` generated games written to <tmp>/<layout...>/ once per session; returns <tmp>."""
    key = f"gen-{seed}-{num}-{'/'.join(layout)}"
    if key not in _cache:
        require_alfworld()
        from rwml_jax.envs.alfworld_gen import generate_games

        out = _tempdir("rwml-alfworld-gen-")
        generate_games(out.joinpath(*layout), num, seed=seed)
        _cache[key] = out
    return _cache[key]


def generated_games(seed: int = 0, num: int = 6) -> Path:
    """A split folder of `num` generated games (one per task type for num=6), generated once per session."""
    return _generate(seed, num)


def valid_seen(source: str) -> ValidSeen:
    """The valid_seen split of `source`: the offline copy ("real") or generated games laid out as
    <tmp>/valid_seen/ ("generated", GENERATED_PER_TYPE games of each task type)."""
    if source == "real":
        return ValidSeen("real", SHARED, REAL_VALID_SEEN_GAMES, REAL_PREFERRED)
    if source == "generated":
        root = _generate(0, GENERATED_PER_TYPE * len(TASK_TYPES), "valid_seen")
        index = json.loads((root / "valid_seen" / "generation.json").read_text())
        return ValidSeen("generated", root, len(index["games"]), {})
    raise ValueError(f"unknown ALFWorld test data source {source!r}; expected one of {DATA_SOURCES}")


def train_split(source: str, per_type: int = 1) -> Path:
    """A data folder holding `per_type` games of each task type in <tmp>/json_2.1.1/train/ (the official
    layout without traj_data.json): streamed out of the train archive ("real") or generated ("generated")."""
    if source == "generated":
        return _generate(1, per_type * len(TASK_TYPES), "json_2.1.1", "train")
    if source != "real":
        raise ValueError(f"unknown ALFWorld test data source {source!r}; expected one of {TRAIN_SOURCES}")
    key = f"train-{per_type}"
    if key in _cache:
        return _cache[key]
    out = _tempdir("rwml-alfworld-train-")
    taken: dict[str, int] = {t: 0 for t in TASK_TYPES}
    chosen: set[str] = set()
    with tarfile.open(TRAIN_ARCHIVE, "r:xz") as tar:
        for member in tar:  # streamed: only the chosen game files are written
            parts = Path(member.name).parts
            if not member.isfile() or parts[-1] != "game.tw-pddl" or len(parts) < 3:
                continue
            trial_key = "/".join(parts[-3:-1])
            ttype = parts[-3].split("-", 1)[0]
            if trial_key not in chosen:
                if taken.get(ttype, per_type) >= per_type:
                    continue
                taken[ttype] += 1
                chosen.add(trial_key)
            dest = out / "json_2.1.1" / "train" / parts[-3] / parts[-2]
            dest.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            (dest / "game.tw-pddl").write_bytes(src.read())
            if all(v >= per_type for v in taken.values()) and len(chosen) == per_type * len(TASK_TYPES):
                break
    _cache[key] = out
    return out
