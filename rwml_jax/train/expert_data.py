"""Expert trajectories and their policy SFT turns, shared by the `warmstart` and `expert_sft` stages.

* ALFWorld: `replay_walkthroughs` plays each game's expert walkthrough (or, with ``teacher="explorer"``, the
  scripted searcher of `rwml_jax.agent.explorer`, which finds things from what its prompt shows) through the
  real engine (worker pool), optionally interleaving side actions (`probe`); `policy_turns` turns one replayed
  episode into ReAct policy turns: the prompt exactly as the rollout builds it (`alfworld_policy_messages`)
  -> `<think> </think><action>a</action>` for every expert step.
* `explorer_relabelled_turns` (DAgger): a student plays ALFWorld games and the explorer labels every state it
  visits, so the student also learns to carry on from its own mistakes.
* τ²: `gold_conversation_turns` plays the tasks' gold conversations (the evaluation's `gold` policy against
  the scripted gold user, `rwml_jax.envs.tau2_gold.gold_script`) through the real τ² adapter and keeps
  each agent turn's prompt (system prompt + tools + the conversation so far, as the rollout builds it)
  -> `<think> </think>` + the gold turn (a tool call, a message to the user, the closing message).
* `encode_turns`: (chat messages, target text) turns -> (prompt ids, completion ids) examples of
  `rwml_jax.train.sft_loop.train_sft`, truncated as the policy's sampler truncates prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rwml_jax.agent.explorer import Explorer, goal_from_walkthrough
from rwml_jax.agent.parse import parse_alfworld_action
from rwml_jax.agent.prompts import alfworld_policy_messages
from rwml_jax.agent.rollout import rollout
from rwml_jax.envs.alfworld_data import load_game_json, resolve_game
from rwml_jax.envs.alfworld_env import task_sentence
from rwml_jax.envs.base import TaskSpec, Transition
from rwml_jax.envs.host_pool import host_pool
from rwml_jax.evaluation.policies import reference_policy
from rwml_jax.evaluation.tasks import TAU2_FACTORY
from rwml_jax.train.encode import encode_completion, encode_prompt
from rwml_jax.train.sft_loop import Example, truncate_example

Turn = tuple[list[dict[str, Any]], str]  # (the policy's prompt messages, the target completion text)
EMPTY_THINK = "<think> </think>"  # the reasoning slot of an expert turn (experts give no reasoning)
TEACHERS = ("walkthrough", "explorer")  # who plays the ALFWorld games of `replay_walkthroughs`


def alfworld_target(action: str) -> str:
    """The ReAct completion of an ALFWorld expert step."""
    return f"{EMPTY_THINK}<action>{action}</action>"


def probe(rng: np.random.Generator, admissible: list[str], next_expert: str, last_action: str | None = None) -> str | None:
    """A side action that leaves the expert plan intact, or None.

    ALFWorld answers an inadmissible command with "Nothing happens." and an unchanged state, and
    `look` / `inventory` / `examine` change nothing either; a `go to` is safe right before an expert
    `go to` (which moves the agent anyway); repeating the previous action (a small policy's commonest
    mistake: "go to" where it stands, a second "take") fails or changes nothing. These probes teach the
    world model what the expert never shows, failed and exploratory actions as a policy sampling at
    temperature 1 produces them, and the policy turn after a probe shows the expert carrying on after one.
    """
    kind = rng.integers(5)
    if kind == 4:
        if last_action and not last_action.startswith(("use ", "move ", "clean ", "heat ", "cool ")):
            return last_action
        kind = rng.integers(4)
    if kind == 0:
        objects = [c.split(" ", 1)[1] for c in admissible if c.startswith(("go to", "examine"))]
        if objects:
            verb = ["take", "open", "use", "heat", "cool", "clean"][rng.integers(6)]
            return f"{verb} {objects[rng.integers(len(objects))]}"  # usually inadmissible: "Nothing happens."
    if kind == 1:
        safe = [c for c in admissible if c in ("look", "inventory") or c.startswith("examine")]
        if safe:
            return safe[rng.integers(len(safe))]
    if kind == 2 and next_expert.startswith("go to"):
        gos = [c for c in admissible if c.startswith("go to") and c != next_expert]
        if gos:
            return gos[rng.integers(len(gos))]
    return None


def replay_walkthroughs(games_dir: str | None, task_ids: list[str], num_workers: int, max_steps: int = 80,
                        probe_prob: float = 0.0, seed: int = 0, split: str = "train",
                        teacher: str = "walkthrough") -> list[list[Transition]]:
    """Play every game with an expert in lockstep through the worker pool -> transitions per game.

    games_dir: the ALFWorld data folder (None = $ALFWORLD_DATA); task_ids: games of `split` under it.
    teacher: "walkthrough" (the game's own plan, which goes straight to the hidden object) or "explorer"
    (`rwml_jax.agent.explorer.Explorer`: searches receptacle by receptacle; an episode ends when won or
    after `max_steps`). With `probe_prob` > 0, a side action (see `probe`) is interleaved before an expert
    step with that probability; probe transitions carry info["probe"] = True (world-model data, not policy
    targets).
    """
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; expected one of {TEACHERS}")
    rng = np.random.default_rng(seed)
    walks = [load_game_json(resolve_game(games_dir, split, t).gamefile)["walkthrough"] for t in task_ids]
    explorers = [Explorer(goal_from_walkthrough(w)) for w in walks] if teacher == "explorer" else None
    episodes: list[list[Transition]] = []
    width = min(len(task_ids), 16)
    with host_pool("rwml_jax.envs.alfworld_env:AlfworldEnv", num_envs=width, num_workers=min(num_workers, width),
                 factory_kwargs={"data_dir": games_dir, "max_steps": max_steps}, run_tag=f"walkthrough-s{seed}") as pool:
        for lo in range(0, len(task_ids), width):
            chunk = list(range(lo, min(lo + width, len(task_ids))))
            tasks = [TaskSpec("alfworld", split, task_ids[i]) for i in chunk]
            results = pool.reset(tasks + [None] * (width - len(chunk)))
            task_text = [task_sentence(r.observation) for r in results[: len(chunk)]]
            obs = [r.observation for r in results[: len(chunk)]]
            infos = [r.info for r in results[: len(chunk)]]
            trs: list[list[Transition]] = [[] for _ in chunk]
            cursor = [0] * len(chunk)
            finished = [False] * len(chunk)
            while not all(finished):
                actions: list[str | None] = []
                probes: list[bool] = []
                for j, i in enumerate(chunk):
                    if finished[j]:
                        actions.append(None)
                        probes.append(False)
                        continue
                    expert = explorers[i].act(infos[j].get("admissible_commands", [])) if explorers else walks[i][cursor[j]]
                    last = trs[j][-1].action if trs[j] else None
                    side = probe(rng, infos[j].get("admissible_commands", []), expert, last) if rng.random() < probe_prob else None
                    actions.append(side or expert)
                    probes.append(side is not None)
                out = pool.step(actions + [None] * (width - len(chunk)))
                for j, (a, r) in enumerate(zip(actions, out)):
                    if a is None or r is None:
                        continue
                    trs[j].append(Transition(
                        episode_id=f"walk-{chunk[j]}", task=tasks[j], step=len(trs[j]), observation=obs[j], action=a,
                        next_observation=r.observation, next_kind="observation", valid=r.valid,
                        reward=r.reward, done=r.done, truncated=r.truncated,
                        info={"admissible_commands": infos[j].get("admissible_commands", []),
                              "task": task_text[j], "probe": probes[j]},
                    ))
                    obs[j], infos[j] = r.observation, r.info
                    if explorers:
                        explorers[chunk[j]].observe(a, r.valid)
                    if not probes[j]:
                        cursor[j] += 1
                    plan_over = len(trs[j]) >= max_steps if explorers else cursor[j] >= len(walks[chunk[j]])
                    finished[j] = r.done or r.truncated or plan_over
            episodes.extend(trs)
    return episodes


def policy_turns(episode: list[Transition], history_length: int) -> list[Turn]:
    """The ReAct policy turns of a replayed ALFWorld episode: one per expert (non-probe) step."""
    task = episode[0].info["task"]
    history: list[tuple[str, str]] = []
    turns = []
    for tr in episode:
        if not tr.info.get("probe"):  # the policy imitates expert steps only
            msgs = alfworld_policy_messages(task, tr.observation, tr.info["admissible_commands"], history,
                                            history_length=history_length)
            turns.append((msgs, alfworld_target(tr.action)))
        history.append((tr.observation, tr.action))
    return turns


def explorer_relabelled_turns(games_dir: str, task_ids: list[str], generate_fn: Any, *, num_workers: int,
                              history_length: int, max_steps: int, seed: int = 0,
                              split: str = "train") -> tuple[list[Turn], dict[str, float]]:
    """DAgger: a student plays the games, and the explorer says what it would do in every state visited.

    generate_fn: the student's rollout generate_fn (chat prompts -> outputs). Each of its turns becomes a
    policy turn with the student's own prompt (the states its mistakes lead to: "Nothing happens.", a
    wrong object in hand) and the explorer's action as the target; the explorer follows the student's
    actions (`Explorer.observe`, an action being valid when it was admissible). Returns (turns, counts:
    episodes, student successes, turns, agreement = the fraction of turns where the student already did
    what the explorer says).
    """
    walks = {t: load_game_json(resolve_game(games_dir, split, t).gamefile)["walkthrough"] for t in task_ids}
    state: dict[str, dict[str, Any]] = {}
    turns: list[Turn] = []
    agree = [0]

    def relabel(prompts: list[Any], contexts: list[Any]) -> list[Any]:
        outputs = generate_fn(prompts)
        for msgs, ctx, out in zip(prompts, contexts, outputs):
            st = state.setdefault(ctx.task.task_id, {"explorer": Explorer(goal_from_walkthrough(walks[ctx.task.task_id]))})
            if "action" in st:
                st["explorer"].observe(st["action"], st["action"] in st["admissible"])
            label = st["explorer"].act(ctx.admissible)
            text = out["text"] if isinstance(out, dict) else out
            action = parse_alfworld_action(text, ctx.admissible).action
            agree[0] += action == label
            st.update(action=action, admissible=ctx.admissible)
            turns.append((msgs, alfworld_target(label)))
        return outputs

    width = max(1, min(len(task_ids), 64))
    with host_pool("rwml_jax.envs.alfworld_env:AlfworldEnv", num_envs=width, num_workers=min(num_workers, width),
                   factory_kwargs={"data_dir": games_dir, "max_steps": max_steps}, run_tag=f"dagger-s{seed}") as pool:
        result = rollout(pool, [TaskSpec("alfworld", split, t) for t in task_ids], relabel,
                         history_length=history_length, max_turns=max_steps, with_context=True)
    counts = {"episodes": len(result.trajectories), "successes": sum(t.success for t in result.trajectories),
              "turns": len(turns), "agreement": agree[0] / max(len(turns), 1)}
    return turns, counts


def gold_conversation_turns(tasks: Sequence[TaskSpec], *, max_steps: int, num_workers: int,
                            seed: int = 0) -> tuple[list[Turn], dict[str, int]]:
    """The agent turns of the τ² tasks' gold conversations (only conversations τ²'s evaluator scores 1.0).

    tasks: τ² TaskSpecs (options carry the domain). Returns (turns, counts: tasks, successes, turns).
    """
    width = max(1, min(len(tasks), 16))
    kwargs = {"user": "scripted", "max_steps": max_steps, "max_messages": 10 * max_steps + 20, "max_errors": 10}
    with host_pool(TAU2_FACTORY, num_envs=width, num_workers=min(num_workers, width), factory_kwargs=kwargs,
                 run_tag=f"gold-s{seed}") as pool:
        result = rollout(pool, list(tasks), reference_policy("gold"), max_turns=max_steps, with_context=True)
    turns: list[Turn] = []
    for traj in result.trajectories:
        if traj.success:
            turns += [(t.prompt, EMPTY_THINK + t.output) for t in traj.turns if t.prompt is not None]
    counts = {"tasks": len(tasks), "successes": sum(t.success for t in result.trajectories), "turns": len(turns)}
    return turns, counts


def encode_turns(tokenizer: Any, turns: Sequence[Turn], max_prompt_tokens: int, max_new_tokens: int | None = None,
                 max_len: int | None = None) -> list[Example]:
    """(prompt ids, completion ids + EOS) per turn: prompts keep their last `max_prompt_tokens` tokens (as the
    sampler keeps them), completions their first `max_new_tokens`; `max_len` caps prompt + completion."""
    out = []
    for msgs, target in turns:
        ex = (encode_prompt(tokenizer, msgs, max_prompt_tokens), encode_completion(tokenizer, target, max_new_tokens))
        out.append(truncate_example(*ex, max_len) if max_len else ex)
    return out
