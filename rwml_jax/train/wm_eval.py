"""World-model data and evaluation shared by the filter, RWML and WM-SFT stages.

The held-out world-model reward is the mean sim-to-real reward (training thresholds) of the model's
predictions on validation triplets, greedy by default, so numbers before and after a stage compare the
same model outputs on the same states.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rwml_jax.models.embedder import qwen3_instruction_prompt
from rwml_jax.rwml.embed_cache import EmbeddingCache
from rwml_jax.rwml.rewards import RewardBatch, RewardConfig, compute_rewards
from rwml_jax.rwml.triplets import Triplet
from rwml_jax.rwml.wm_prompts import wm_messages, wm_sft_target
from rwml_jax.train.encode import encode_completion
from rwml_jax.train.sft_loop import Example, truncate_example


def reward_config(config: Any, *, strict: bool = False) -> RewardConfig:
    """The recipe's training thresholds, or the easy-sample filter's stricter ones (`strict`)."""
    r = config.rewards
    # how a state is embedded and ROUGE computed is the same everywhere; the think penalty is a training
    # term (the filter's "all K correct" would never hold with it)
    same = dict(rouge_grid=r.rouge_grid, realized_instruction=r.realized_instruction,
                prediction_max_tokens=r.prediction_max_tokens, rouge_stemmer=r.rouge_stemmer)
    if strict:
        return RewardConfig(threshold_observation=config.filter.threshold_observation,
                            threshold_user_reply=config.filter.threshold_user_reply, **same)
    return RewardConfig(threshold_observation=r.threshold_observation, threshold_user_reply=r.threshold_user_reply,
                        think_penalty=r.think_penalty, think_min_tokens=r.think_min_tokens,
                        status_penalty=r.status_penalty, **same)


def realized_cache(work_dir: Any, embedder: Any, cfg: RewardConfig) -> EmbeddingCache:
    """The on-disk cache of the realised states' embeddings beside the triplets (with the reward's query
    instruction, when it has one)."""
    prompt = qwen3_instruction_prompt(cfg.realized_instruction) if cfg.realized_instruction else None
    return EmbeddingCache.beside(Path(work_dir) / "triplets", embedder, prompt=prompt)


def sft_examples(policy: Any, triplets: Sequence[Triplet], max_new_tokens: int) -> list[Example]:
    """Next-state SFT pairs: world-model prompt -> `<think> </think><next_state>s'</next_state>` + EOS."""
    out = []
    for t in triplets:
        prompt = policy.encode(wm_messages(t))
        target = encode_completion(policy.tokenizer, wm_sft_target(t.next_state, t.context.get("task_status", "")),
                                    max_new_tokens)
        out.append(truncate_example(prompt, target, policy.max_prompt_tokens + max_new_tokens))
    return out


def score(outputs: Sequence[str], triplets: Sequence[Triplet], embedder: Any, cfg: RewardConfig,
          repeat: int = 1, *, realized_cache: EmbeddingCache | None = None) -> RewardBatch:
    """Rewards of `outputs` (len(triplets) * repeat, grouped by triplet) against the realised states.

    realized_cache: the realised states' embeddings are read from (and added to) this cache instead of
    being embedded again (the rwml stage caches them per dataset).
    """
    realized = [t.next_state for t in triplets for _ in range(repeat)]
    kinds = [t.kind for t in triplets for _ in range(repeat)]
    vecs = realized_cache.embed(realized) if realized_cache is not None else None
    statuses = [t.context.get("task_status", "") for t in triplets for _ in range(repeat)]
    return compute_rewards(list(outputs), realized, kinds, embedder, cfg, realized_embeddings=vecs,
                           task_statuses=statuses if any(statuses) else None)


def evaluate(policy: Any, params: Any, triplets: Sequence[Triplet], embedder: Any, cfg: RewardConfig, *,
             samples: int = 1, temperature: float = 0.0, seed: int = 0, batch_prompts: int = 64,
             num_examples: int = 0) -> dict[str, Any]:
    """Held-out reward of `params` on `triplets`: {"mean_reward", "std", per-kind means, "unparsable",
    "valid_action/mean_reward" and
    "invalid_action/mean_reward" (and their counts "/n"), "examples": up to `num_examples` (prompt state, action, prediction, real, reward) rows}."""
    outputs: list[str] = []
    cut = 0
    for lo in range(0, len(triplets), batch_prompts):
        chunk = triplets[lo:lo + batch_prompts]
        _, comps = policy.sample(params, [wm_messages(t) for t in chunk], n=samples, temperature=temperature,
                                 seed=seed + lo)
        outputs.extend(c.text for cs in comps for c in cs)
        cut += sum(c.truncated for cs in comps for c in cs)
    rb = score(outputs, triplets, embedder, cfg, repeat=samples)
    result: dict[str, Any] = {
        "mean_reward": float(rb.rewards.mean()),
        "std_reward": float(rb.rewards.std()),
        "unparsable": float(rb.stats["unparsable"] / max(rb.stats["n"], 1)),
        "truncated": float(cut / max(len(outputs), 1)),  # cut at max_new_tokens (a thinking model out of room)
        "n": len(triplets),
    }
    for k, v in rb.stats.items():
        if k.endswith("/mean_reward"):
            result[k] = v
    # Failed actions ("Nothing happens." in ALFWorld) are easy to learn and often dominate the data of a
    # weak policy, so the reward on accepted actions is reported on its own.
    per_triplet = rb.rewards.reshape(len(triplets), samples).mean(axis=1)
    valid = np.array([t.valid for t in triplets], bool)
    for name, sel in (("valid_action", valid), ("invalid_action", ~valid)):
        result[f"{name}/n"] = int(sel.sum())
        result[f"{name}/mean_reward"] = float(per_triplet[sel].mean()) if sel.any() else float("nan")
    rows = []
    for i, t in enumerate(triplets[:num_examples]):
        rows.append({"action": t.action, "real": t.next_state, "prediction": outputs[i * samples],
                     "reward": float(rb.rewards[i * samples])})
    result["examples"] = rows
    return result

