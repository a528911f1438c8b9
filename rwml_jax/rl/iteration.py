"""One GRPO iteration: sample -> score -> advantages -> pack -> update, from a batch of prompts to an
update and its metrics.

Two entry points, one path:
  `grpo_iteration`: single-turn GRPO (the rwml stage, the benchmark): G completions of each prompt,
      scored by a caller's function, one group per prompt.
  `update_from_rollouts`: the same advantages + pack + update for rollouts built elsewhere, e.g.
      multi-turn policy RL, where a row is one agent turn, a group is the G episodes of one task and
      every turn of an episode carries its episode's advantage (`Rollouts.episode_ids`).

The sampler and the scorer come in as callables, so this layer knows nothing of prompts' text, world
models or environments:
  sample(params, prompt_ids, n, seed) -> len(prompt_ids) * n completions, prompt by prompt; each has
      `ids` (the sampled token ids, stop token included) and `logprobs` ([len(ids)] float, the sampling
      policy's log-probs, used as `old_logp`);
  score(completions) -> rewards [N], or (rewards [N], extra metrics {name: float}).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from rwml_jax.rl import grpo
from rwml_jax.rl.batch import Batch, pack, pad_logprobs, pad_rows, with_grpo_fields


class Completion(Protocol):
    """What `sample` returns per row (e.g. `rwml_jax.train.policy.Completion`)."""

    ids: Sequence[int]
    logprobs: np.ndarray


SampleFn = Callable[[Any, Sequence[Sequence[int]], int, int], Sequence[Completion]]
Scored = np.ndarray | tuple[np.ndarray, Mapping[str, float]]  # rewards [N], optionally with extra metrics
ScoreFn = Callable[[Sequence[Completion]], Scored]


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """B training rows with their rewards and groups.

    prompt_ids[b]: the row's prompt token ids (non-empty); completion_ids[b]: its sampled tokens;
    old_logp[b]: [len(completion_ids[b])] float, the sampling policy's log-probs of those tokens;
    rewards: [B] float; group_ids: [B], rows with one id form one GRPO group (the G samples of one
    prompt, or the episodes of one task); episode_ids: optional [B], rows with one id are the turns of
    one episode and share its reward and group (None: every row is its own episode).
    """

    prompt_ids: Sequence[Sequence[int]]
    completion_ids: Sequence[Sequence[int]]
    old_logp: Sequence[np.ndarray]
    rewards: np.ndarray
    group_ids: np.ndarray
    episode_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        B = len(self.prompt_ids)
        object.__setattr__(self, "rewards", np.asarray(self.rewards, np.float64))
        object.__setattr__(self, "group_ids", np.asarray(self.group_ids))
        if B == 0:
            raise ValueError("no rollouts")
        sizes = {"completion_ids": (len(self.completion_ids),), "old_logp": (len(self.old_logp),),
                 "rewards": self.rewards.shape, "group_ids": self.group_ids.shape}
        wrong = {k: v for k, v in sizes.items() if v != (B,)}
        if wrong:
            raise ValueError(f"{B} prompt rows, but these fields are not [{B}]: {wrong}")
        for b, (ids, lp) in enumerate(zip(self.completion_ids, self.old_logp)):
            if len(lp) != len(ids):
                raise ValueError(f"row {b}: {len(ids)} completion tokens but {len(lp)} log-probs")
        if self.episode_ids is not None:
            ep = np.asarray(self.episode_ids)
            if ep.shape != (B,):
                raise ValueError(f"episode_ids has shape {ep.shape}, expected ({B},)")
            object.__setattr__(self, "episode_ids", ep)
            _, first, inverse = np.unique(ep, return_index=True, return_inverse=True)
            for name, v in (("reward", self.rewards), ("group", self.group_ids)):
                bad = np.flatnonzero(v != v[first][inverse])
                if bad.size:
                    raise ValueError(f"rows {bad[:5].tolist()} differ in {name} from their episode's first turn")

    @classmethod
    def grouped(cls, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion], rewards: Any,
                group_size: int) -> Rollouts:
        """Single-turn rollouts: `completions` holds `group_size` samples of each prompt, prompt by prompt;
        group g is prompt g."""
        if len(completions) != len(prompt_ids) * group_size:
            raise ValueError(f"{len(completions)} completions for {len(prompt_ids)} prompts x group_size={group_size}")
        return cls(prompt_ids=[p for p in prompt_ids for _ in range(group_size)],
                   completion_ids=[c.ids for c in completions], old_logp=[c.logprobs for c in completions],
                   rewards=rewards, group_ids=np.repeat(np.arange(len(prompt_ids)), group_size))

    @classmethod
    def from_episodes(cls, turns: Sequence[Sequence[tuple[Sequence[int], Sequence[int], Any]]], rewards: Any,
                      group_ids: Any) -> Rollouts:
        """Multi-turn rollouts with a terminal reward and γ = 1: episode e has turns[e] = [(prompt_ids,
        completion_ids, logprobs [len(completion_ids)]), ...], each turn its own prompt; rewards[e] and
        group_ids[e] (e.g. its task) are the episode's. Every turn becomes a row carrying its episode's
        reward, group and id e, so `advantages` gives all turns of an episode the episode's advantage
        within its group, wherever the episodes of a group sit. Episodes without turns add no rows."""
        rewards, group_ids = np.asarray(rewards, np.float64), np.asarray(group_ids)
        if not (len(turns) == len(rewards) == len(group_ids)):
            raise ValueError(f"{len(turns)} episodes, {len(rewards)} rewards, {len(group_ids)} group ids")
        ep = np.array([e for e, ts in enumerate(turns) for _ in ts], np.int64)
        rows = [t for ts in turns for t in ts]
        return cls(prompt_ids=[list(p) for p, _, _ in rows], completion_ids=[list(c) for _, c, _ in rows],
                   old_logp=[np.asarray(lp, np.float32) for _, _, lp in rows], rewards=rewards[ep],
                   group_ids=group_ids[ep], episode_ids=ep)

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids)

    def advantages(self, *, normalize_std: bool = True) -> np.ndarray:
        """[B] float32: each episode's group-relative advantage (`grpo.advantages` over episodes, one
        reward each, grouped by `group_ids`), given to every row of the episode."""
        if self.episode_ids is None:
            return grpo.advantages(self.rewards, self.group_ids, normalize_std=normalize_std)
        _, first, inverse = np.unique(self.episode_ids, return_index=True, return_inverse=True)
        per_episode = grpo.advantages(self.rewards[first], self.group_ids[first], normalize_std=normalize_std)
        return per_episode[inverse]


def pack_rollouts(rollouts: Rollouts, advantages: Any, *, pad_id: int, completion_len: int,
                  prompt_len: int | None = None, prompt_multiple: int = 1) -> Batch:
    """The GRPO batch of `rollouts` ("split" layout of `rwml_jax.rl.batch`, `advantages` [B] and
    `old_logp` [B, completion_len]).

    prompt_len: prompt slots; None: the longest prompt rounded up to a multiple of `prompt_multiple`
    (a few fixed shapes keep the jitted step from recompiling for every batch).
    """
    if prompt_len is None:
        longest = max(map(len, rollouts.prompt_ids))
        prompt_len = max(prompt_multiple, -(-longest // prompt_multiple) * prompt_multiple)
    batch = pack(rollouts.prompt_ids, rollouts.completion_ids, prompt_len=prompt_len, completion_len=completion_len,
                 layout="split", pad_id=pad_id)
    return with_grpo_fields(batch, advantages, pad_logprobs(rollouts.old_logp, completion_len))


def apply_update(step_fn: Callable[..., Any], state: Any, batch: Batch, ref_params: Any = None) -> tuple[Any, dict[str, float]]:
    """One jitted GRPO step (`rwml_jax.rl.update.make_grpo_step`) -> (new state, its metrics as floats).
    Reading the metrics waits for the step."""
    state, m = step_fn(state, batch, ref_params) if ref_params is not None else step_fn(state, batch)
    return state, {k: float(v) for k, v in jax.device_get(m).items()}


def update_from_rollouts(step_fn: Callable[..., Any], state: Any, rollouts: Rollouts, advantages: Any, *,
                         pad_id: int, completion_len: int, prompt_len: int | None = None, prompt_multiple: int = 1,
                         ref_params: Any = None, row_multiple: int = 1) -> tuple[Any, dict[str, float]]:
    """Pack `rollouts` with `advantages` [B] (`pack_rollouts`) and apply one update (`apply_update`).

    row_multiple > 1: the batch is padded (`rwml_jax.rl.batch.pad_rows`) to `row_multiple` x a power of
    two rows, so batches of varying sizes (multi-turn episodes) compile a few step shapes only."""
    batch = pack_rollouts(rollouts, advantages, pad_id=pad_id, completion_len=completion_len, prompt_len=prompt_len,
                          prompt_multiple=prompt_multiple)
    if row_multiple > 1:
        chunks = -(-rollouts.num_rows // row_multiple)
        batch = pad_rows(batch, row_multiple * (1 << max(0, chunks - 1).bit_length()))
    return apply_update(step_fn, state, batch, ref_params)


def reward_metrics(rewards: np.ndarray, group_ids: np.ndarray) -> dict[str, float]:
    """reward_mean / reward_std over rows, and the fractions of groups with some reward > 0
    (frac_groups_any_correct), all rewards >= 1 (frac_groups_all_correct) and one reward value
    (frac_groups_no_signal: zero advantage for every row)."""
    rewards, group_ids = np.asarray(rewards), np.asarray(group_ids)
    groups = [rewards[group_ids == g] for g in np.unique(group_ids)]
    return {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "frac_groups_any_correct": float(np.mean([g.max() > 0 for g in groups])),
        "frac_groups_all_correct": float(np.mean([g.min() >= 1 for g in groups])),
        "frac_groups_no_signal": float(np.mean([g.std() == 0 for g in groups])),
    }


def grpo_iteration(state: Any, prompts: Sequence[Sequence[int]], *, sample: SampleFn, score: ScoreFn,
                   group_size: int, step_fn: Callable[..., Any], pad_id: int, completion_len: int, seed: int,
                   normalize_std: bool = True, prompt_multiple: int = 1,
                   ref_params: Any = None) -> tuple[Any, dict[str, float], Rollouts]:
    """One GRPO iteration on `prompts` (token-id lists): `group_size` samples of each with
    `state.params`, scored, group-normalised, packed and applied as one update.

    completion_len: completion slots of the batch (>= the sampler's max new tokens); prompt_multiple:
    see `pack_rollouts`. Returns (new state, metrics, rollouts). Metrics: the step's own (loss, pg_loss,
    ref_kl, ...), `reward_metrics`, the scorer's extra metrics, completion_len_mean / completion_len_max
    (tokens), tokens_per_s (sampled tokens per second of sampling), and wall-clock seconds
    time/generate_s, time/reward_s (the scorer), time/pack_s (advantages and packing), time/update_s
    (the step, until its metrics are read) and time/step_s (the whole iteration).
    """
    t0 = time.perf_counter()
    completions = list(sample(state.params, prompts, group_size, seed))
    t_gen = time.perf_counter() - t0
    scored = score(completions)
    rewards, extra = scored if isinstance(scored, tuple) else (scored, {})
    t_reward = time.perf_counter() - t0 - t_gen
    rollouts = Rollouts.grouped(prompts, completions, rewards, group_size)
    batch = pack_rollouts(rollouts, rollouts.advantages(normalize_std=normalize_std), pad_id=pad_id,
                          completion_len=completion_len, prompt_multiple=prompt_multiple)
    t_pack = time.perf_counter() - t0 - t_gen - t_reward
    state, metrics = apply_update(step_fn, state, batch, ref_params)
    t_update = time.perf_counter() - t0 - t_gen - t_reward - t_pack
    lengths = np.array([len(c) for c in rollouts.completion_ids])
    metrics.update(reward_metrics(rollouts.rewards, rollouts.group_ids))
    metrics.update({k: float(v) for k, v in extra.items()})
    metrics.update({
        "completion_len_mean": float(lengths.mean()), "completion_len_max": float(lengths.max()),
        "tokens_per_s": float(lengths.sum() / max(t_gen, 1e-9)),
        "time/generate_s": t_gen, "time/reward_s": t_reward, "time/pack_s": t_pack, "time/update_s": t_update,
        "time/step_s": time.perf_counter() - t0,
    })
    return state, metrics, rollouts
