"""The CPU demo's `warmstart` stage: a tokenizer and a tiny model trained from scratch, honestly.

No pretrained weights can be downloaded on the demo machine, so this stage builds the "base model" the
paper takes from the hub:

1. generates `warmstart.num_games` ALFWorld games (a seed disjoint from the collect games) and replays
   their expert walkthroughs through the real engine (worker pool), interleaving side actions that leave
   the plan intact with probability `warmstart.probe_prob` (failed, looking and detour actions);
2. trains a byte-level BPE tokenizer with a ChatML template on the replayed text and the prompts;
3. trains a `model.preset` Qwen3-architecture model from random init, by SFT on two kinds of turns from
   those replays: ReAct policy turns of the expert steps (prompt -> `<think> </think><action>a</action>`)
   and world-model turns of every step (prompt -> `<think> </think><next_state>s'</next_state>`);
4. saves it as a Hugging Face folder (`warmstart/model`) that every later stage loads like a hub model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import jax
import numpy as np

from rwml_jax.agent.prompts import alfworld_policy_messages
from rwml_jax.envs.alfworld_data import load_game_json, resolve_game
from rwml_jax.envs.alfworld_env import task_sentence
from rwml_jax.envs.alfworld_gen import generate_games
from rwml_jax.envs.base import TaskSpec, Transition
from rwml_jax.envs.host_pool import host_pool
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.decoder import init_params_sharded
from rwml_jax.models.hf_io import save_pretrained
from rwml_jax.models.tokenizer import train_tokenizer
from rwml_jax.rwml.triplets import triplets_from_episode
from rwml_jax.rwml.wm_prompts import wm_messages, wm_sft_target
from rwml_jax.train.encode import encode_completion, encode_prompt
from rwml_jax.train.metrics_log import MetricsLogger
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.sft_loop import examples_stats, train_sft, truncate_example
from rwml_jax.train.stage_io import Stage, write_jsonl

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("seed", "model", "warmstart", "optimizer", "env.name", "env.data_dir", "env.num_generated_games",
               "env.max_steps")

log = logging.getLogger(__name__)

WARMSTART_SEED_OFFSET = 10_007  # warm-start games never share a seed with the collect games


def _probe(rng: np.random.Generator, admissible: list[str], next_expert: str) -> str | None:
    """A side action that leaves the expert plan intact, or None.

    ALFWorld answers an inadmissible command with "Nothing happens." and an unchanged state, and
    `look` / `inventory` / `examine` change nothing either; a `go to` is safe right before an expert
    `go to` (which moves the agent anyway). These probes teach the world model what the expert never
    shows: failed and exploratory actions, as a policy sampling at temperature 1 produces them.
    """
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


def replay_walkthroughs(games_dir: str, task_ids: list[str], num_workers: int, max_steps: int = 80,
                        probe_prob: float = 0.0, seed: int = 0) -> list[list[Transition]]:
    """Play every game's walkthrough in lockstep through the worker pool -> transitions per game.

    With `probe_prob` > 0, a side action (see `_probe`) is interleaved before an expert step with that
    probability; probe transitions carry info["probe"] = True (world-model data, not policy targets).
    """

    rng = np.random.default_rng(seed)
    walks = [load_game_json(resolve_game(games_dir, "train", t).gamefile)["walkthrough"] for t in task_ids]
    episodes: list[list[Transition]] = []
    width = min(len(task_ids), 16)
    with host_pool("rwml_jax.envs.alfworld_env:AlfworldEnv", num_envs=width, num_workers=min(num_workers, width),
                 factory_kwargs={"data_dir": games_dir, "max_steps": max_steps}, run_tag=f"warmstart-s{seed}") as pool:
        for lo in range(0, len(task_ids), width):
            chunk = list(range(lo, min(lo + width, len(task_ids))))
            tasks = [TaskSpec("alfworld", "train", task_ids[i]) for i in chunk]
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
                    expert = walks[i][cursor[j]]
                    side = _probe(rng, infos[j].get("admissible_commands", []), expert) if rng.random() < probe_prob else None
                    actions.append(side or expert)
                    probes.append(side is not None)
                out = pool.step(actions + [None] * (width - len(chunk)))
                for j, (a, r) in enumerate(zip(actions, out)):
                    if a is None or r is None:
                        continue
                    trs[j].append(Transition(
                        episode_id=f"warm-{chunk[j]}", task=tasks[j], step=len(trs[j]), observation=obs[j], action=a,
                        next_observation=r.observation, next_kind="observation", valid=r.valid,
                        reward=r.reward, done=r.done, truncated=r.truncated,
                        info={"admissible_commands": infos[j].get("admissible_commands", []),
                              "task": task_text[j], "probe": probes[j]},
                    ))
                    obs[j], infos[j] = r.observation, r.info
                    if not probes[j]:
                        cursor[j] += 1
                    finished[j] = r.done or r.truncated or cursor[j] >= len(walks[chunk[j]])
            episodes.extend(trs)
    return episodes


def _policy_turns(episode: list[Transition], history_length: int) -> list[tuple[list[dict], str]]:
    task = episode[0].info["task"]
    history: list[tuple[str, str]] = []
    turns = []
    for tr in episode:
        if not tr.info.get("probe"):  # the policy imitates expert steps only
            msgs = alfworld_policy_messages(task, tr.observation, tr.info["admissible_commands"], history,
                                            history_length=history_length)
            turns.append((msgs, f"<think> </think><action>{tr.action}</action>"))
        history.append((tr.observation, tr.action))
    return turns


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    from configs.models import PRESETS

    c = rt.config
    w = c.warmstart
    if w.corpus != "walkthrough":  # the one corpus built (validation refuses others)
        raise ValueError(f"warmstart.corpus={w.corpus!r}: only 'walkthrough' is built")
    stage = Stage(rt.work_dir, "warmstart")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})

    games_dir = stage.local_folder("games")
    games = generate_games(games_dir, w.num_games, seed=c.seed + WARMSTART_SEED_OFFSET)
    episodes = replay_walkthroughs(os.fspath(games_dir), [g.folder for g in games], c.env.num_workers or os.cpu_count() or 1,
                                   probe_prob=w.probe_prob, seed=c.seed + WARMSTART_SEED_OFFSET)
    wins = sum(1 for e in episodes if e and e[-1].reward > 0)
    probes = sum(1 for e in episodes for t in e if t.info.get("probe"))
    policy_turns = [t for e in episodes for t in _policy_turns(e, c.collect.history_length)]
    wm_triplets = [t for e in episodes for t in triplets_from_episode(e, history_length=c.triplets.history_length)]
    wm_turns = [(wm_messages(t), wm_sft_target(t.next_state)) for t in wm_triplets]
    log.info("warmstart corpus: %d games (%d won), %d policy turns, %d world-model turns",
             len(episodes), wins, len(policy_turns), len(wm_turns))

    tok_dir = stage.file("model")
    texts = [m["content"] for msgs, _ in policy_turns + wm_turns for m in msgs] + [t for _, t in policy_turns + wm_turns]
    preset = dict(PRESETS[c.model.preset])
    # trained into a folder of this process (save_pretrained below writes it into the shared model folder)
    tokenizer = train_tokenizer(texts, tempfile.mkdtemp(prefix="rwml-tok-"), vocab_size=min(w.tokenizer_vocab_size, preset["vocab_size"]))
    examples = []
    for msgs, target in policy_turns + wm_turns:
        p = encode_prompt(tokenizer, msgs, w.seq_len)
        examples.append(truncate_example(p, encode_completion(tokenizer, target), w.seq_len))
    write_jsonl(stage.file("corpus_stats.jsonl"), [examples_stats(examples)])

    preset.update(vocab_size=preset["vocab_size"], eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model_config = ModelConfig.from_hf_dict(preset, param_dtype=c.model.dtype, compute_dtype=c.model.compute_dtype)

    def init_params():
        return init_params_sharded(model_config, jax.random.key(c.seed), rt.mesh)

    logger = MetricsLogger.for_stage(stage.path, c)
    params, metrics = train_sft(
        stage_dir=stage.path, mesh=rt.mesh, model_config=model_config, init_params=init_params,
        examples=examples, learning_rate=w.learning_rate, epochs=w.epochs, batch_size=w.batch_size,
        micro_batch_size=w.micro_batch_size, warmup_steps=w.warmup_steps, seed=c.seed, pad_id=tokenizer.pad_token_id,
        max_steps=w.steps, optimizer=c.optimizer, checkpoint_every=c.checkpoint.every_steps, keep=c.checkpoint.keep,
        logger=logger, desc="warmstart", execution=rt.execution(model_config),
    )
    logger.close()
    save_pretrained(model_config, params, tok_dir, tokenizer=tokenizer)
    summary = {
        "games": len(episodes), "walkthrough_wins": wins, "probe_transitions": probes, "policy_turns": len(policy_turns),
        "world_model_turns": len(wm_turns), "params": model_config.num_params,
        "final_loss": metrics.get("loss", float("nan")), "tokens_mean": float(np.mean([len(a) + len(b) for a, b in examples])),
    }
    stage.finish(c, summary=summary, outputs=["model/config.json", "model/model.safetensors"])
    return summary

