"""The scripted ALFWorld searcher (the demo warm start's teacher) against the real engine: it wins generated
games without knowing where things are, every command it sends is admissible, and its replays become the
warm start's policy turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alfworld_testdata import require_alfworld
from rwml_jax.agent.explorer import Explorer, TaskGoal, goal_from_walkthrough
from rwml_jax.envs.alfworld_data import TASK_TYPES, list_games
from rwml_jax.envs.base import TaskSpec

require_alfworld()

from rwml_jax.envs.alfworld_env import AlfworldEnv
from rwml_jax.envs.alfworld_gen import generate_games
from rwml_jax.train.expert_data import policy_turns, replay_walkthroughs


def test_goal_from_walkthrough_reads_the_task_classes():
    assert goal_from_walkthrough(["go to shelf 2", "take bowl 1 from shelf 2", "go to coffeetable 1",
                                  "move bowl 1 to coffeetable 1"]) == TaskGoal(obj="bowl", target="coffeetable")
    heat = goal_from_walkthrough(["go to sinkbasin 1", "take plate 1 from sinkbasin 1", "go to microwave 1",
                                  "heat plate 1 with microwave 1", "go to fridge 1", "open fridge 1",
                                  "move plate 1 to fridge 1"])
    assert heat == TaskGoal(obj="plate", target="fridge", transform=("heat", "microwave"))
    look = goal_from_walkthrough(["go to drawer 1", "open drawer 1", "take creditcard 1 from drawer 1",
                                  "go to desk 1", "use desklamp 1"])
    assert look == TaskGoal(obj="creditcard", lamp="desklamp")
    two = goal_from_walkthrough(["go to bed 1", "take baseballbat 1 from bed 1", "go to sidetable 1",
                                 "move baseballbat 1 to sidetable 1", "go to bed 1", "take baseballbat 2 from bed 1",
                                 "go to sidetable 1", "move baseballbat 2 to sidetable 1"])
    assert two.count == 2 and two.target == "sidetable"
    with pytest.raises(ValueError, match="takes no object"):
        goal_from_walkthrough(["go to desk 1", "look"])


def test_explorer_wins_generated_games_searching_with_admissible_commands_only(tmp_path):
    games = generate_games(tmp_path, 18, seed=3)  # three of each task type
    env = AlfworldEnv(str(tmp_path), max_steps=40)
    lengths: dict[str, list[int]] = {t: [] for t in TASK_TYPES}
    detours = 0
    try:
        for g in games:
            r = env.reset(TaskSpec("alfworld", "train", g.folder))
            explorer = Explorer(goal_from_walkthrough(g.walkthrough))
            first = explorer.act(r.info["admissible_commands"])
            # the search starts at the first receptacle of the list, wherever the object is
            assert first == next(c for c in r.info["admissible_commands"] if c.startswith("go to "))
            actions = []
            for step in range(30):
                a = explorer.act(r.info["admissible_commands"]) if step else first
                assert a in r.info["admissible_commands"], (g.folder, a, r.info["admissible_commands"])
                actions.append(a)
                r = env.step(a)
                explorer.observe(a, r.valid)
                if r.done:
                    break
            assert r.reward == 1.0 and r.info["won"], (g.folder, actions)
            lengths[g.task_type].append(len(actions))
            detours += len(actions) > len(g.walkthrough)
    finally:
        env.close()
    assert all(len(v) == 3 for v in lengths.values())
    assert detours >= len(games) // 2, "the explorer should search, not walk straight to the object"
    assert sum(n <= 15 for v in lengths.values() for n in v) >= 14, lengths  # the demo's episode limit


def test_explorer_replays_become_policy_turns(tmp_path):
    games = generate_games(tmp_path, 6, seed=4)
    ids = [g.folder for g in games]
    episodes = replay_walkthroughs(str(tmp_path), ids, num_workers=1, max_steps=30, probe_prob=0.3, seed=1,
                                   teacher="explorer")
    assert len(episodes) == 6 and all(e[-1].reward > 0 for e in episodes)
    walks = {g.folder: g.walkthrough for g in games}
    for e in episodes:
        actions = [t.action for t in e if not t.info.get("probe")]
        assert actions != walks[e[0].task.task_id] or len(actions) == len(walks[e[0].task.task_id])
        turns = policy_turns(e, history_length=2)
        assert [target for _, target in turns] == [f"<think> </think><action>{a}</action>" for a in actions]
        assert all(t.valid for t in e if not t.info.get("probe"))
    with pytest.raises(ValueError, match="unknown teacher"):
        replay_walkthroughs(str(tmp_path), ids[:1], num_workers=1, teacher="oracle")
    index = json.loads((Path(tmp_path) / "generation.json").read_text())
    assert {x["task_id"] for x in index["games"]} == {g.task_id for g in list_games(str(tmp_path), "train")}


def test_probes_repeat_the_last_action_but_never_one_that_changes_the_world():
    import numpy as np

    from rwml_jax.train.expert_data import probe

    rng = np.random.default_rng(0)
    admissible = ["examine desk 1", "go to drawer 1", "go to shelf 1", "inventory", "look"]
    after_go = [probe(rng, admissible, "go to shelf 1", "go to desk 1") for _ in range(200)]
    assert "go to desk 1" in after_go  # "go to" where the agent stands: "Nothing happens."
    after_use = [probe(rng, admissible, "go to shelf 1", "use desklamp 1") for _ in range(200)]
    after_move = [probe(rng, admissible, "go to shelf 1", "move pen 1 to desk 1") for _ in range(200)]
    assert "use desklamp 1" not in after_use and "move pen 1 to desk 1" not in after_move


def test_dagger_relabels_the_states_a_student_reaches(tmp_path):
    """A student that only ever looks around: the explorer's label stays its first search step, the
    prompts are the student's own (its "look" in the history), and nothing is won."""
    from rwml_jax.train.expert_data import explorer_relabelled_turns

    games = generate_games(tmp_path, 3, seed=5)
    calls = []

    def student(prompts):
        calls.append(len(prompts))
        return [{"text": "<think> </think><action>look</action>", "num_tokens": 4} for _ in prompts]

    turns, counts = explorer_relabelled_turns(str(tmp_path), [g.folder for g in games], student, num_workers=1,
                                              history_length=1, max_steps=4)
    assert counts == {"episodes": 3, "successes": 0, "turns": 12, "agreement": 0.0}
    assert calls == [3, 3, 3, 3]
    env = AlfworldEnv(str(tmp_path), max_steps=5)
    try:
        for k, g in enumerate(sorted(games, key=lambda g: g.folder)):
            first = env.reset(TaskSpec("alfworld", "train", g.folder))
            want = Explorer(goal_from_walkthrough(g.walkthrough)).act(first.info["admissible_commands"])
            mine = [t for t in turns if f"Your task is to: {first.info['task']}" in t[0][0]["content"]]
            assert mine and all(target == f"<think> </think><action>{want}</action>" for _, target in mine)
            assert any("Action 1: 'look'" in msgs[0]["content"] for msgs, _ in mine)
    finally:
        env.close()


def test_warmstart_stage_with_the_explorer_and_a_dagger_round(tmp_path):
    from rwml_jax.config import load_config
    from rwml_jax.train.run import run_stages

    work = tmp_path / "run"
    config = load_config("demo_cpu:smoke", [
        f"--config.work_dir={work}", "--config.stages=warmstart", "--config.warmstart.num_games=6",
        "--config.warmstart.steps=4", "--config.warmstart.dagger_rounds=1", "--config.warmstart.dagger_steps=2",
        "--config.env.num_workers=1",
    ])
    assert config.warmstart.corpus == "explorer"
    summary = run_stages(config)["warmstart"]
    assert summary["corpus"] == "explorer" and summary["games"] == 6 and summary["walkthrough_wins"] == 6
    (r,) = summary["dagger"]
    assert r["round"] == 1 and r["episodes"] == 6 and 6 <= r["turns"] <= 6 * 15 and 0 <= r["agreement"] <= 1
    assert (work / "warmstart" / "dagger_1").is_dir() and (work / "warmstart" / "model" / "config.json").is_file()
    rows = [json.loads(line) for line in open(work / "warmstart" / "metrics.jsonl")]
    assert any("warmstart_dagger1/loss" in row for row in rows)
