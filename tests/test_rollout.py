"""Multi-turn batched rollout over the real ALFWorld engine (worker pool) with a deterministic policy."""

import dataclasses
import json
import os
import re
import signal

import pytest
from alfworld_testdata import DATA_SOURCES, require_alfworld, valid_seen

from rwml_jax.agent.parse import INVALID_ACTION
from rwml_jax.agent.rollout import rollout
from rwml_jax.agent.trajectory import Trajectory
from rwml_jax.rwml.triplets import build_triplets

require_alfworld()

from rwml_jax.envs.alfworld_data import load_game_json, resolve_game
from rwml_jax.envs.alfworld_env import AlfworldEnv
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.pool import EnvPool

MALFORMED = "I think I should pick up the book first."  # no <think>, no <action>: a format error
MAX_STEPS = 10  # the pool's episode step limit


@dataclasses.dataclass(frozen=True)
class Games:
    """The two valid_seen games the rollouts play, from one data source."""

    data: str  # the data folder
    a: str  # task id of game A (a look_at_obj_in_light game, played by its walkthrough)
    b: str  # task id of game B (a pick_and_place_simple game, one malformed turn first)

    def walkthrough(self, task_id: str) -> list[str]:
        return load_game_json(resolve_game(self.data, "valid_seen", task_id).gamefile)["walkthrough"]

    def tasks(self, *task_ids: str) -> list[TaskSpec]:
        return [TaskSpec("alfworld", "valid_seen", t, seed=5) for t in task_ids]


@pytest.fixture(scope="module", params=DATA_SOURCES)
def games(request) -> Games:
    """Generated games always, the offline valid_seen copy where it exists."""
    data = valid_seen(request.param)
    g = Games(str(data.root), data.game("look_at_obj_in_light").task_id, data.game("pick_and_place_simple").task_id)
    # the walkthrough policy wins both within the step limit (B takes one turn more)
    assert len(g.walkthrough(g.a)) < MAX_STEPS and len(g.walkthrough(g.b)) + 1 < MAX_STEPS
    return g


class WalkthroughPolicy:
    """Follows each game's walkthrough, read off the prompt (task sentence + step number).

    For game B it first answers with a malformed turn, then follows the walkthrough one step later.
    """

    def __init__(self, games: Games, sentences: dict[str, str]) -> None:
        self.sentences = sentences  # task sentence -> task id
        self.by_task = {games.a: (games.walkthrough(games.a), False), games.b: (games.walkthrough(games.b), True)}
        self.calls: list[int] = []

    def __call__(self, prompts):
        self.calls.append(len(prompts))
        outs = []
        for p in prompts:
            assert isinstance(p, list) and p[0]["role"] == "user", "rollout must pass chat messages"
            text = p[0]["content"]
            task = re.search(r"Your task is to: (.*)\n", text).group(1).strip()
            m = re.search(r"You are now at step (\d+)", text)
            step = int(m.group(1)) if m else 1
            walk, malformed_first = self.by_task[self.sentences[task]]
            idx = step - 1 - (1 if malformed_first else 0)
            if idx < 0:
                outs.append(MALFORMED)
            else:
                outs.append({"text": f"<think>step {step} of the plan</think><action>{walk[idx]}</action>",
                             "tokens": [0] * (step + 3)})
        return outs


@pytest.fixture(scope="module")
def pool(games):
    with EnvPool("rwml_jax.envs.alfworld_env:AlfworldEnv", num_envs=3, num_workers=2,
                 factory_kwargs={"data_dir": games.data, "max_steps": MAX_STEPS}) as p:
        yield p


@pytest.fixture(scope="module")
def reference_observations(games):
    """Each game's walkthrough replayed in-process by the real engine: first observation + one per action."""
    env = AlfworldEnv(games.data, max_steps=MAX_STEPS)
    out = {}
    try:
        for tid, prefix in ((games.a, []), (games.b, [INVALID_ACTION])):
            first = env.reset(TaskSpec("alfworld", "valid_seen", tid, seed=5))
            obs = [first.observation]
            for a in prefix + games.walkthrough(tid):
                obs.append(env.step(a).observation)
            out[tid] = (first.info["task"], obs)
    finally:
        env.close()
    return out


def test_rollout_walkthrough_policy_wins_and_records_transitions(games, pool, reference_observations):
    policy = WalkthroughPolicy(games, {sentence: tid for tid, (sentence, _) in reference_observations.items()})
    tasks = games.tasks(games.a, games.b)
    res = rollout(pool, tasks, policy, trajectories_per_task=2, history_length=2,
                  provenance={"model": "walkthrough-policy", "config_hash": "abc123", "seed": 5})
    trajs = res.trajectories
    # 4 episodes over 3 slots: the 4th starts when the first finishes; output ordered by (task, sample)
    assert [(t.task.task_id, t.sample_index) for t in trajs] == [(games.a, 0), (games.a, 1), (games.b, 0),
                                                                  (games.b, 1)]
    assert max(policy.calls) == 3 and min(policy.calls) >= 1  # live episodes generated together each turn
    assert len({t.episode_id for t in trajs}) == 4
    for t in trajs:
        walk = games.walkthrough(t.task.task_id)
        malformed = t.task.task_id == games.b
        sentence, ref_obs = reference_observations[t.task.task_id]
        assert t.success and t.done and not t.truncated and t.reward == 1.0 and t.error is None
        assert t.task.seed == 5  # group episodes share the reset seed
        assert t.provenance["model"] == "walkthrough-policy" and t.provenance["history_length"] == 2
        assert t.reset_info["task"] == sentence and t.reset_info["task_type"] == t.task.task_id.split("-")[0]
        actions = ([INVALID_ACTION] if malformed else []) + walk
        assert [turn.action for turn in t.turns] == actions
        assert t.num_steps == len(actions)
        assert t.num_invalid == t.num_format_errors == (1 if malformed else 0)
        # before / after observations chain and match the engine's own replay
        assert t.first_observation == ref_obs[0]
        for i, turn in enumerate(t.turns):
            tr = turn.transition
            assert tr.episode_id == t.episode_id and tr.step == i and tr.task == t.task
            assert tr.action == actions[i] and tr.next_kind == "observation"
            assert tr.observation == ref_obs[i] and tr.next_observation == ref_obs[i + 1]
            if i > 0:
                assert tr.observation == t.turns[i - 1].transition.next_observation
            # the prompt holds the current observation and at most H=2 history pairs
            prompt = turn.prompt[0]["content"]
            assert ref_obs[i].replace("-= Welcome to TextWorld, ALFRED! =-", "").strip() in prompt
            assert prompt.count("[Observation ") == min(i, 2)
        assert t.turns[-1].transition.done and t.turns[-1].transition.reward == 1.0
        if malformed:
            first = t.turns[0]
            assert not first.format_ok and first.output == MALFORMED and "no <action>" in first.format_error
            assert not first.transition.valid and first.transition.next_observation == "Nothing happens."
            assert all(turn.format_ok and turn.transition.valid for turn in t.turns[1:])
        else:
            assert all(turn.format_ok and turn.has_think and turn.transition.valid for turn in t.turns)
        assert all(turn.output_tokens is not None for turn in t.turns if turn.format_ok)
    s = res.stats
    assert s.episodes == 4 and s.successes == 4 and s.success_rate == 1.0
    len_a, len_b = len(games.walkthrough(games.a)), len(games.walkthrough(games.b))
    assert s.steps == 2 * len_a + 2 * (len_b + 1) and s.format_errors == 2 and s.invalid_steps == 2
    # JSON round trip of what the collect stage writes
    back = [Trajectory.from_dict(json.loads(json.dumps(t.to_dict()))) for t in trajs]
    assert back == trajs


def test_rollouts_in_fresh_pools_with_one_run_tag_are_identical(games, reference_observations):
    """Reproducibility across runs: whichever worker answers first, two fresh pools with the same run tag
    give byte-identical trajectories, episode ids included (the train/val split sorts triplet ids)."""
    tasks = games.tasks(games.a, games.b)
    sentences = {sentence: tid for tid, (sentence, _) in reference_observations.items()}
    runs = []
    for _ in range(2):
        with EnvPool("rwml_jax.envs.alfworld_env:AlfworldEnv", num_envs=3, num_workers=2, run_tag="collect-s0",
                     factory_kwargs={"data_dir": games.data, "max_steps": MAX_STEPS}) as p:
            res = rollout(p, tasks * 2, WalkthroughPolicy(games, sentences), trajectories_per_task=2)
        runs.append(json.dumps([t.to_dict() for t in res.trajectories], sort_keys=True))
        assert all(t.episode_id.startswith("collect-s0-") for t in res.trajectories)
    assert runs[0] == runs[1]


def test_rollout_turn_limit_and_text_prompts(games, pool, reference_observations):
    policy = WalkthroughPolicy(games, {sentence: tid for tid, (sentence, _) in reference_observations.items()})
    seen = []

    def text_policy(prompts):
        seen.extend(prompts)
        return policy([[{"role": "user", "content": p.removeprefix("User: ").removesuffix("\n\nAssistant:")}]
                       for p in prompts])

    res = rollout(pool, games.tasks(games.b), text_policy, max_turns=2,
                  prompt_format="text", record_prompts=False)
    (t,) = res.trajectories
    assert all(isinstance(p, str) and p.startswith("User: You are an expert agent") for p in seen)
    assert t.num_steps == 2 and t.truncated and not t.success and t.turns[0].prompt is None
    assert res.stats.truncated == 1


def test_rollout_rejects_bad_generate_fn(games, pool):
    with pytest.raises(ValueError, match="returned 0 results for 1 prompts"):
        rollout(pool, [TaskSpec("alfworld", "valid_seen", games.a)], lambda prompts: [])


def test_worker_crash_truncates_only_its_episode(games, pool, reference_observations):
    """SIGKILL the worker hosting slot 1 mid-rollout: its episodes are kept, truncated, with the error; the
    others finish, and the next episode runs on the restarted worker. (Resets are scheduled on whichever
    worker is free, so which other slots share slot 1's worker is read from the pool at the kill.)"""
    policy = WalkthroughPolicy(games, {sentence: tid for tid, (sentence, _) in reference_observations.items()})
    calls = {"n": 0}
    victims: set[str] = set()

    def killing_policy(prompts):
        calls["n"] += 1
        if calls["n"] == 2:
            w = pool.worker_of(1)
            victims.update(pool.episode_id(s) for s in range(pool.num_envs) if pool.worker_of(s) == w)
            os.kill(pool.worker_pids()[w], signal.SIGKILL)
        return policy(prompts)

    restarts = pool.restarts
    res = rollout(pool, games.tasks(games.a, games.b), killing_policy, trajectories_per_task=2)
    a0, a1, b0, b1 = res.trajectories  # slots 0, 1, 2, then b1 in the first freed slot
    assert pool.restarts == restarts + 1
    assert a1.episode_id in victims and b1.episode_id not in victims
    for t in res.trajectories:
        if t.episode_id in victims:
            assert t.truncated and not t.success and "died from signal SIGKILL" in t.error
            assert t.num_steps == 2 and t.turns[-1].transition.next_observation == ""
        else:
            assert t.success and t.error is None
    assert res.stats.crashed == len(victims) and res.stats.successes == 4 - len(victims)
    trips = build_triplets(res.trajectories)
    assert [t.step for t in trips if t.episode_id == a1.episode_id] == [0]  # no triplet without a real s_{t+1}
