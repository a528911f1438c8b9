"""ALFWorld adapter against the real alfworld / TextWorld engine and the real game files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alfworld_testdata import DATA_SOURCES, TRAIN_SOURCES, generated_games, require_alfworld, train_split, valid_seen
from rwml_jax.envs.alfworld_data import (TASK_TYPES, AlfworldDataError, list_games, resolve_game,
                                         split_dir)
from rwml_jax.envs.base import TaskSpec, TextEnv

require_alfworld()

from rwml_jax.envs import alfworld_memo
from rwml_jax.envs.alfworld_env import BANNER, NOTHING_HAPPENS, AlfworldEnv


def one_per_type(games):
    seen = {}
    for g in games:
        seen.setdefault(g.task_type, g)
    return [seen[t] for t in TASK_TYPES if t in seen]


@pytest.fixture(scope="module", params=DATA_SOURCES)
def data(request):
    """valid_seen of each data source: generated games always, the offline copy where it exists."""
    return valid_seen(request.param)


@pytest.fixture(scope="module")
def env(data):
    e = AlfworldEnv(data.root, max_steps=30)
    yield e
    e.close()


def test_valid_seen_listing_and_filters(data):
    games = list_games(data.root, "valid_seen")
    assert len(games) == data.num_games
    assert {g.task_type for g in games} == set(TASK_TYPES)
    assert all(Path(g.gamefile).name == "game.tw-pddl" and g.split == "valid_seen" for g in games)
    heat = list_games(data.root, "id", task_types=["pick_heat_then_place_in_recep"])  # "id" = valid_seen
    assert 0 < len(heat) < data.num_games and all(g.task_type == "pick_heat_then_place_in_recep" for g in heat)
    assert all(g.task_id.startswith("pick_heat_then_place_in_recep-") for g in heat)
    with pytest.raises(ValueError, match="unknown ALFWorld task type"):
        list_games(data.root, "valid_seen", task_types=["pick_and_juggle"])
    with pytest.raises(ValueError, match="unknown ALFWorld split"):
        list_games(data.root, "validation")


def test_missing_data_folder_says_how_to_get_it(data, tmp_path, monkeypatch):
    with pytest.raises(AlfworldDataError) as e:
        list_games(tmp_path / "nowhere", "valid_seen")
    assert "alfworld-download" in str(e.value) and "ALFWORLD_DATA" in str(e.value)
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(AlfworldDataError, match="ALFWORLD_DATA is not set"):
        split_dir(None, "valid_seen")
    # the data folder has no OOD split: the error names what exists
    with pytest.raises(AlfworldDataError, match="has no 'valid_unseen' split.*valid_seen"):
        list_games(data.root, "ood")
    # an existing but empty official folder
    (tmp_path / "json_2.1.1" / "valid_unseen").mkdir(parents=True)
    with pytest.raises(AlfworldDataError, match="no ALFWorld games"):
        list_games(tmp_path, "valid_unseen")


def test_walkthroughs_win_one_game_per_task_type(data, env):
    assert isinstance(env, TextEnv)
    for game in one_per_type(list_games(data.root, "valid_seen")):
        walk = json.loads(Path(game.gamefile).read_text())["walkthrough"]
        first = env.reset(TaskSpec("alfworld", "valid_seen", game.task_id))
        assert first.observation.startswith(BANNER)
        assert "You are in the middle of a room." in first.observation
        assert first.observation.rstrip().endswith(first.info["task"]) and first.info["task"]
        assert first.info["task_type"] == game.task_type
        assert os.path.realpath(first.info["gamefile"]) == os.path.realpath(game.gamefile)
        assert not first.done and not first.truncated and first.valid and first.next_kind == "observation"
        admissible = first.info["admissible_commands"]
        for i, action in enumerate(walk):
            assert action in admissible, (game.task_id, action)
            res = env.step(action)
            last = i == len(walk) - 1
            assert res.valid and res.observation != NOTHING_HAPPENS
            assert res.done == last and res.info["won"] == last and res.reward == (1.0 if last else 0.0)
            assert not res.truncated
            admissible = res.info["admissible_commands"]
        with pytest.raises(RuntimeError, match="reset"):
            env.step("look")


def test_invalid_actions_and_step_limit(data, env):
    game = list_games(data.root, "valid_seen", task_types=["pick_and_place_simple"])[0]
    res = env.reset(TaskSpec("alfworld", "valid_seen", game.task_id, options=(("max_steps", 3),)))
    assert res.info["max_steps"] == 3
    # not a command at all
    r1 = env.step("dance with the fridge")
    assert r1.observation == NOTHING_HAPPENS and not r1.valid and not r1.done and not r1.truncated
    # well-formed but not applicable here (nothing is held)
    obj = game.task_id.split("-")[1].lower()
    r2 = env.step(f"move {obj} 1 to {game.task_id.split('-')[3].lower()} 1")
    assert not r2.valid and r2.observation == NOTHING_HAPPENS
    # a valid action still counts, and the third step hits the limit
    r3 = env.step("look")
    assert r3.valid and r3.truncated and not r3.done and r3.reward == 0.0
    with pytest.raises(RuntimeError):
        env.step("look")
    with pytest.raises(ValueError, match="unknown ALFWorld task option"):
        env.reset(TaskSpec("alfworld", "valid_seen", game.task_id, options=(("max_stepz", 3),)))
    with pytest.raises(ValueError, match="unknown ALFWorld task id"):
        env.reset(TaskSpec("alfworld", "valid_seen", "pick_and_place_simple-Nothing-None-Nowhere-1/trial_x"))


def test_strip_banner_and_path_task_ids():
    game = generated_games()
    g = list_games(game, "train")[0]
    e = AlfworldEnv(None, strip_banner=True)  # a path task id needs no data folder
    try:
        res = e.reset(TaskSpec("alfworld", "train", g.gamefile))
        assert not res.observation.startswith(BANNER) and res.observation.startswith("You are in the middle")
        assert res.info["task_id"] == g.task_id and res.info["task_type"] == g.task_type
    finally:
        e.close()


def test_official_layout_with_traj_data(data, tmp_path):
    """$ALFWORLD_DATA/json_2.1.1/<split>/<task>/<trial>/{traj_data.json, game.tw-pddl}: the task type comes
    from traj_data.json, as in alfworld's AlfredTWEnv."""
    src = one_per_type(list_games(data.root, "valid_seen"))[0]
    trial = tmp_path / "json_2.1.1" / "valid_unseen" / "some_task_folder" / "trial_T0"
    trial.mkdir(parents=True)
    shutil.copy(src.gamefile, trial / "game.tw-pddl")
    (trial / "traj_data.json").write_text(json.dumps({"task_type": src.task_type}))
    games = list_games(tmp_path, "ood")
    assert [(g.task_id, g.task_type, g.split) for g in games] == [
        ("some_task_folder/trial_T0", src.task_type, "valid_unseen")]
    assert resolve_game(tmp_path, "valid_unseen", "some_task_folder/trial_T0").gamefile == games[0].gamefile
    # unsolvable games are skipped, like AlfredTWEnv does
    data = json.loads((trial / "game.tw-pddl").read_text())
    data["solvable"] = False
    (trial / "game.tw-pddl").write_text(json.dumps(data))
    with pytest.raises(AlfworldDataError):
        list_games(tmp_path, "valid_unseen")


def test_memoized_engine_is_identical_to_plain_engine(data):
    """alfworld_memo caches pure parsing steps; the observations and admissible commands must not change."""
    game = data.game("pick_clean_then_place_in_recep")
    walk = json.loads(Path(game.gamefile).read_text())["walkthrough"]
    take = next(i for i, a in enumerate(walk) if a.startswith("take "))
    examine_held = walk[take].split(" from ")[0].replace("take ", "examine ")
    actions = ["inventory", "fly", *walk[:take + 2], examine_held, *walk[take + 2:]]  # examined one step later

    def play(e: AlfworldEnv) -> list:
        r = e.reset(TaskSpec("alfworld", "valid_seen", game.task_id))
        trace = [(r.observation, r.info["admissible_commands"])]
        for a in actions:
            r = e.step(a)
            trace.append((a, r.observation, r.valid, r.reward, r.done, r.info["admissible_commands"]))
        return trace

    was_installed = alfworld_memo.installed()
    alfworld_memo.uninstall()
    try:
        e = AlfworldEnv(data.root, max_steps=100, memoize=False)
        plain = play(e)
        e.close()
        assert not alfworld_memo.installed()
        before = alfworld_memo.stats()
        e = AlfworldEnv(data.root, max_steps=100, memoize=True)
        fast = [play(e), play(e)]  # the second reset of the same game hits the caches
        e.close()
        after = alfworld_memo.stats()
    finally:
        if was_installed:
            alfworld_memo.install()
    assert after["sas_hits"] > before["sas_hits"] and after["parse_hits"] > before["parse_hits"]
    assert fast[0] == plain and fast[1] == plain
    assert plain[-1][4] is True and sum(not t[2] for t in plain[1:]) == 1  # won; only "fly" was invalid


@pytest.mark.slow
@pytest.mark.parametrize("source", TRAIN_SOURCES)
def test_train_split_sample_replays_to_wins(source):
    """Two games of every task type in the official folder layout without traj_data.json (generated, or
    streamed from the shared train archive), replayed through the worker pool."""
    from rwml_jax.envs.replay import replay_alfworld

    data = train_split(source, per_type=2)
    report = replay_alfworld(data, "train", workers=2, progress=None)
    assert len(report.games) == 2 * len(TASK_TYPES)
    assert {g.task_type for g in report.games} == set(TASK_TYPES)
    assert report.wins == len(report.games), [g for g in report.games if not g.won]
    assert all(g.invalid == 0 for g in report.games)


@pytest.mark.slow
@pytest.mark.parametrize("source", [
    pytest.param(s, marks=pytest.mark.skipif(
        s == "real" and os.environ.get("RWML_ALFWORLD_FULL_REPLAY") != "1",
        reason="the full 140-game replay takes 10-25 min on 2 cores; set RWML_ALFWORLD_FULL_REPLAY=1 "
               "(or run `rwml-jax envs replay --env alfworld --data ../shared/data/alfworld`)"))
    for s in DATA_SOURCES])
def test_full_valid_seen_replay_wins_every_game(source, tmp_path):
    from rwml_jax.envs.replay import replay_alfworld

    data = valid_seen(source)
    out = tmp_path / "replay.json"
    report = replay_alfworld(data.root, "valid_seen", workers=2, json_out=out, progress=None)
    n = data.num_games
    assert report.wins == len(report.games) == n, [g for g in report.games if not g.won]
    table = json.loads(out.read_text())
    assert table["rows"][-1] == {"task_type": "total", "games": n, "wins": n}
    assert sum(r["games"] for r in table["rows"][:-1]) == n


def test_memo_defers_the_planner_translation_without_changing_plans(data):
    """alfworld_memo skips the optimised PDDL translation at load (only the planner reads it) and makes it
    on the first replan: the expert plans ("policy_commands") must equal the unmodified engine's."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    game = data.game("pick_clean_then_place_in_recep")
    walk = json.loads(Path(game.gamefile).read_text())["walkthrough"]

    def play(with_plans: bool) -> list:
        infos = textworld.EnvInfos(won=True, admissible_commands=True, policy_commands=with_plans)
        env = textworld.start(game.gamefile, request_infos=infos, wrappers=[AlfredDemangler(), AlfredInfos])
        st = env.reset()
        trace = [(st["feedback"], st["admissible_commands"], st["policy_commands"] if with_plans else None)]
        for a in walk[:3]:
            st, _, _ = env.step(a)
            trace.append((st["feedback"], st["admissible_commands"], st["policy_commands"] if with_plans else None))
        env.close()
        return trace

    was_installed = alfworld_memo.installed()
    alfworld_memo.uninstall()
    try:
        plain = play(True)
        alfworld_memo.install()
        s0 = alfworld_memo.stats()
        no_plans = play(False)
        s1 = alfworld_memo.stats()
        with_plans = play(True)
        s2 = alfworld_memo.stats()
    finally:
        alfworld_memo.uninstall()
        if was_installed:
            alfworld_memo.install()
    assert s1["replan_deferred"] > s0["replan_deferred"] and s1["replan_translated"] == s0["replan_translated"]
    assert s2["replan_translated"] > s1["replan_translated"]  # made on the first plan request
    assert with_plans == plain
    assert [t[:2] for t in no_plans] == [t[:2] for t in plain]
    assert plain[0][2][:2] == walk[:2]  # the planner's plan starts like the walkthrough
