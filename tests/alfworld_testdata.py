"""Shared ALFWorld test data: the offline copy of valid_seen, the train archive, and generated games.

Helpers (not fixtures) so several test modules can share one generated set per test session.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/alfworld next to the repository (override with RWML_ALFWORLD_SHARED)
SHARED = Path(os.environ.get("RWML_ALFWORLD_SHARED", REPO.parent / "shared" / "data" / "alfworld"))
TRAIN_ARCHIVE = SHARED / "json_2.1.1_train.tar.xz"

_cache: dict[str, Path] = {}


def require_alfworld() -> None:
    pytest.importorskip("textworld", reason="the ALFWorld tests need the alfworld package (pip install alfworld)")
    pytest.importorskip("alfworld", reason="the ALFWorld tests need the alfworld package (pip install alfworld)")


def shared_data() -> Path:
    """The offline data folder holding valid_seen/ (skips if absent)."""
    if not (SHARED / "valid_seen").is_dir():
        pytest.skip(f"offline ALFWorld data not found at {SHARED} (set RWML_ALFWORLD_SHARED)")
    return SHARED


def _tempdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, True)
    return d


def generated_games(seed: int = 0, num: int = 6) -> Path:
    """A folder of `num` generated games (one per task type for num=6), generated once per session."""
    key = f"gen-{seed}-{num}"
    if key not in _cache:
        require_alfworld()
        from rwml_jax.envs.alfworld_gen import generate_games

        out = _tempdir("rwml-alfworld-gen-")
        generate_games(out, num, seed=seed)
        _cache[key] = out
    return _cache[key]


def train_sample(per_type: int = 1) -> Path:
    """`per_type` games of each task type streamed out of the train archive into
    <tmp>/json_2.1.1/train/ (official layout without traj_data.json); skips if the archive is missing."""
    key = f"train-{per_type}"
    if key in _cache:
        return _cache[key]
    if not TRAIN_ARCHIVE.is_file():
        pytest.skip(f"ALFWorld train archive not found at {TRAIN_ARCHIVE}: the train-sample replay needs it")
    from rwml_jax.envs.alfworld_data import TASK_TYPES

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
