"""Finding ALFWorld games on disk: splits, task types and the two supported data layouts.

Layouts accepted (`root` is what the user passes as the data folder, or $ALFWORLD_DATA):
- official (`alfworld-download`): root/json_2.1.1/{train,valid_seen,valid_unseen}/<task>/trial_*/
  {traj_data.json, game.tw-pddl, initial_state.pddl}; the task type is traj_data.json's "task_type".
- offline copy (a folder holding valid_seen/ etc., and generated games): root/<split>/<task>/trial_*/game.tw-pddl,
  or root/json_2.1.1/<split>/... without traj_data.json; the task type is the folder-name prefix.
- a split folder itself (root/<task>/trial_*/game.tw-pddl), e.g. the output of `rwml-jax envs generate`.

A game's *task id* is its trial folder relative to the split folder: "<task>/<trial>". Like ALFWorld's own
AlfredTWEnv, games marked unsolvable and the unsupported "movable"/"Sliced" variants are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLITS: tuple[str, ...] = ("train", "valid_seen", "valid_unseen")
# Paper / verl-agent names for the evaluation splits.
SPLIT_ALIASES = {"id": "valid_seen", "in_distribution": "valid_seen", "ood": "valid_unseen",
                 "out_of_distribution": "valid_unseen", "eval_in_distribution": "valid_seen",
                 "eval_out_of_distribution": "valid_unseen"}
GAME_FILE = "game.tw-pddl"
_SOLVABLE = re.compile(r'"solvable"\s*:\s*(true|false)')
log = logging.getLogger(__name__)

HOW_TO_GET_DATA = (
    "Get the ALFWorld data with `alfworld-download` (it fills $ALFWORLD_DATA, default ~/.cache/alfworld, "
    "with json_2.1.1/{train,valid_seen,valid_unseen}) and set ALFWORLD_DATA, or pass a local copy "
    "(a folder holding <split>/<task>/trial_*/game.tw-pddl, e.g. valid_seen/), or generate "
    "small offline games with `rwml-jax envs generate --out DIR`."
)


class AlfworldDataError(FileNotFoundError):
    """The ALFWorld data folder is missing or holds no games for the requested split."""


@dataclasses.dataclass(frozen=True)
class GameRef:
    """One ALFWorld game: where its game.tw-pddl lives and what it asks for."""

    task_id: str  # "<task folder>/<trial folder>", relative to the split folder
    gamefile: str  # absolute path of game.tw-pddl
    task_type: str  # one of TASK_TYPES
    split: str


def normalize_split(split: str) -> str:
    s = SPLIT_ALIASES.get(split.lower(), split)
    if s not in SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}; expected one of {SPLITS} "
                         f"(or aliases {sorted(SPLIT_ALIASES)})")
    return s


def task_type_of(task_folder: str, traj_data_path: str | os.PathLike | None = None) -> str:
    """Task type from traj_data.json when present, else from the folder-name prefix."""
    if traj_data_path is not None and os.path.exists(traj_data_path):
        with open(traj_data_path) as f:
            return json.load(f)["task_type"]
    prefix = os.path.basename(os.path.normpath(task_folder)).split("-", 1)[0]
    if prefix not in TASK_TYPES:
        raise ValueError(f"cannot tell the task type of game folder {task_folder!r}: its name should start "
                         f"with one of {TASK_TYPES} (or it should hold a traj_data.json)")
    return prefix


def default_data_root() -> str | None:
    """$ALFWORLD_DATA if set (the official download location), else None."""
    root = os.environ.get("ALFWORLD_DATA")
    return os.path.expandvars(os.path.expanduser(root)) if root else None


def _looks_like_split_dir(path: Path) -> bool:
    """True if `path` directly holds <task>/<trial>/game.tw-pddl folders."""
    try:
        for task_dir in path.iterdir():
            if task_dir.is_dir() and task_dir.name.split("-", 1)[0] in TASK_TYPES:
                return True
    except OSError:
        return False
    return False


def split_dir(root: str | os.PathLike | None, split: str) -> Path:
    """The folder holding `split`'s games under `root` (either layout). Raises AlfworldDataError."""
    split = normalize_split(split)
    if root is None:
        root = default_data_root()
        if root is None:
            raise AlfworldDataError(f"no ALFWorld data folder given and ALFWORLD_DATA is not set. "
                                    f"{HOW_TO_GET_DATA}")
    base = Path(os.path.expandvars(os.path.expanduser(str(root))))
    if not base.exists():
        raise AlfworldDataError(f"ALFWorld data folder {str(base)!r} does not exist. {HOW_TO_GET_DATA}")
    for cand in (base / "json_2.1.1" / split, base / split):
        if cand.is_dir():
            return cand
    if base.name == split or (base.name not in SPLITS and _looks_like_split_dir(base)):
        return base  # the split folder itself (e.g. generated games)
    found = [s for s in SPLITS if (base / s).is_dir() or (base / "json_2.1.1" / s).is_dir()]
    hint = f" It has splits {found}." if found else ""
    if split == "train" and (base / "json_2.1.1_train.tar.xz").exists():
        hint += (f" The train split is packed in {base / 'json_2.1.1_train.tar.xz'}: extract it outside the "
                 f"repository (`tar -xJf ... -C /tmp/alfworld_train`) and pass /tmp/alfworld_train.")
    raise AlfworldDataError(f"ALFWorld data folder {str(base)!r} has no {split!r} split.{hint} "
                            f"{HOW_TO_GET_DATA}")


@dataclasses.dataclass(frozen=True)
class BrokenGame:
    """A game folder whose game.tw-pddl cannot be loaded (unreadable, truncated or malformed JSON)."""

    task_id: str
    gamefile: str
    task_type: str
    split: str
    error: str


def scan_games(root: str | os.PathLike | None, split: str,
               task_types: tuple[str, ...] | list[str] | None = None, *,
               full_check: bool = False) -> tuple[list[GameRef], list[BrokenGame]]:
    """(playable games, games that cannot be loaded) of `split` under `root`, both sorted by task id.

    A game file that cannot be read or parsed is never dropped silently: it is returned as a `BrokenGame`
    naming the file and the error. full_check: parse every game file completely and check its keys
    (~10 ms a game; otherwise only the "solvable" flag is read, which catches most truncations).
    Raises AlfworldDataError when the folder or split is missing or holds no game file at all, ValueError
    for an unknown task type.
    """
    split = normalize_split(split)
    if task_types is not None:
        unknown = [t for t in task_types if t not in TASK_TYPES]
        if unknown:
            raise ValueError(f"unknown ALFWorld task type(s) {unknown}; expected some of {TASK_TYPES}")
    base = split_dir(root, split)
    games: list[GameRef] = []
    broken: list[BrokenGame] = []
    for dirpath, _dirnames, filenames in os.walk(base):
        if GAME_FILE not in filenames:
            continue
        if "movable" in dirpath or "Sliced" in dirpath:  # as AlfredTWEnv: unsupported variants
            continue
        rel = os.path.relpath(dirpath, base)
        task_folder = os.path.dirname(rel) or rel
        gamefile = os.path.join(dirpath, GAME_FILE)
        ttype = task_type_of(task_folder, os.path.join(dirpath, "traj_data.json"))
        if task_types is not None and ttype not in task_types:
            continue
        task_id = rel.replace(os.sep, "/")
        solvable, error = _solvable_flag(gamefile, full_check)
        if error is not None:
            broken.append(BrokenGame(task_id, os.path.abspath(gamefile), ttype, split, error))
            continue
        if not solvable:
            continue
        games.append(GameRef(task_id=task_id, gamefile=os.path.abspath(gamefile), task_type=ttype, split=split))
    if not games and not broken:
        which = f" of task types {list(task_types)}" if task_types else ""
        raise AlfworldDataError(f"no ALFWorld games{which} found under {str(base)!r} (looked for "
                                f"<task>/<trial>/{GAME_FILE}). {HOW_TO_GET_DATA}")
    games.sort(key=lambda g: g.task_id)
    broken.sort(key=lambda g: g.task_id)
    return games, broken


def list_games(root: str | os.PathLike | None, split: str,
               task_types: tuple[str, ...] | list[str] | None = None) -> list[GameRef]:
    """All playable games of `split` under `root`, sorted by task id, optionally of some task types only.

    Game files that cannot be loaded are logged by name (`scan_games` returns them); callers that score
    games (replay, evaluation) use `scan_games` and count them. Raises AlfworldDataError when the folder
    or split is missing or holds no playable game, ValueError for an unknown task type.
    """
    games, broken = scan_games(root, split, task_types)
    for b in broken:
        log.warning("ALFWorld game %s cannot be loaded (%s): %s", b.task_id, b.gamefile, b.error)
    if not games:
        raise AlfworldDataError(f"no loadable ALFWorld games in split {split!r} under {str(root)!r}: "
                                f"{len(broken)} game file(s) are broken, e.g. {broken[0].gamefile}: "
                                f"{broken[0].error}")
    return games


_GAME_KEYS = ("pddl_domain", "grammar", "pddl_problem")


def _solvable_flag(gamefile: str, full_check: bool = False) -> tuple[bool, str | None]:
    """(the game file's own "solvable" flag, None) or (False, why the file cannot be loaded).

    Without `full_check` the flag is read from the raw text (a full JSON parse of 3,553 train games takes
    tens of seconds); the key sits after the PDDL and grammar strings, which never contain it. Files
    without the key are parsed completely.
    """
    try:
        with open(gamefile) as f:
            text = f.read()
    except OSError as e:
        return False, f"unreadable: {e}"
    m = _SOLVABLE.search(text, max(0, text.rfind('"solvable"')))
    if m is not None and not full_check:
        return m.group(1) == "true", None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return False, f"not valid JSON (truncated or corrupt file, {len(text)} bytes): {e}"
    if not isinstance(data, dict) or any(k not in data for k in _GAME_KEYS):
        missing = [k for k in _GAME_KEYS if not isinstance(data, dict) or k not in data]
        return False, f"not an ALFWorld game file: missing {missing}"
    return bool(data.get("solvable", True)), None


def resolve_game(root: str | os.PathLike | None, split: str, task_id: str) -> GameRef:
    """The game for `task_id` ("<task>/<trial>" in `split`, or a path to a game.tw-pddl / trial folder)."""
    p = Path(os.path.expanduser(task_id))
    if p.is_absolute() or p.exists():
        gamefile = p / GAME_FILE if p.is_dir() else p
        if not gamefile.is_file():
            raise ValueError(f"ALFWorld task {task_id!r}: no {GAME_FILE} there")
        trial = gamefile.parent
        return GameRef(task_id=f"{trial.parent.name}/{trial.name}", gamefile=str(gamefile.resolve()),
                       task_type=task_type_of(trial.parent.name, trial / "traj_data.json"),
                       split=normalize_split(split) if split in SPLITS or split in SPLIT_ALIASES else split)
    base = split_dir(root, split)
    gamefile = base / task_id / GAME_FILE
    if not gamefile.is_file():
        raise ValueError(f"unknown ALFWorld task id {task_id!r} in split {split!r}: {str(gamefile)!r} does not "
                         f"exist (task ids look like '<task folder>/<trial folder>'; see list_games)")
    task_folder = task_id.replace("\\", "/").split("/")[0]
    return GameRef(task_id=task_id, gamefile=str(gamefile.resolve()),
                   task_type=task_type_of(task_folder, gamefile.parent / "traj_data.json"),
                   split=normalize_split(split))


def load_game_json(gamefile: str | os.PathLike) -> dict:
    """The game.tw-pddl JSON (pddl_domain, grammar, pddl_problem, solvable, walkthrough)."""
    with open(gamefile) as f:
        return json.load(f)
