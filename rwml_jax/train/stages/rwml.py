"""Stage 4, `rwml`: world-model GRPO with the sim-to-real reward (the paper's method), or with an LLM judge's
reward (`rewards.kind = "judge"`, the paper's ablation; the held-out reward stays the embedding reward, so runs
with either training reward are measured alike).

Each step takes `batch_prompts` filtered triplets in the cursor's order, samples G predictions of each
with the current policy, scores them against the realised next states (embedded once per dataset and
cached on disk), and applies one GRPO update with group-normalised advantages, the clipped ratio
against the sampler's log-probs and a k3 KL to the start model. Every `eval_every` steps (and at step 0
and the end) the held-out world-model reward is measured on the validation split. Checkpoints hold the
train state, the data cursor and the RNG; `eval.jsonl`, `metrics.jsonl` and tensorboard are cut back to
the restored step on resume. Output: `rwml/model` (HF folder), `rwml/eval.jsonl`, `rwml/reward_curve.png`.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from rwml_jax.models.hf_io import save_pretrained
from rwml_jax.rl.iteration import grpo_iteration
from rwml_jax.rl.shared_prompt import micro_batching
from rwml_jax.rl.train_state import OptimizerConfig
from rwml_jax.rl.update import GRPOConfig, make_grpo_step
from rwml_jax.rwml.embed_cache import EmbeddingCache
from rwml_jax.rwml.judge import JudgeReward
from rwml_jax.rwml.rewards import RewardConfig
from rwml_jax.rwml.triplets import Triplet
from rwml_jax.rwml.wm_prompts import wm_messages
from rwml_jax.sharding import batch_size_multiple
from rwml_jax.train.loop import TrainLoop, num_steps
from rwml_jax.train.metrics_log import MetricsLogger, progress
from rwml_jax.train.plots import plot_reward_curve
from rwml_jax.train.policy import Completion, PolicySampler
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.served_models import judge_generator
from rwml_jax.train.stage_io import Stage, StepRecords
from rwml_jax.train.stages.filter import final_train_set
from rwml_jax.train.stages.triplets import load_split
from rwml_jax.train.wm_eval import evaluate, realized_cache, reward_config, score

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("rwml", "rewards", "embedder", "optimizer")
# Of those, the ones that change speed or memory but not the output (fnmatch patterns).
IGNORED_KEYS = ("rwml.eval_every", "embedder.batch_size")

log = logging.getLogger(__name__)


def eval_subset(rt: Runtime, size: int):
    """The validation triplets of the held-out reward (a fixed, seeded subset when `size` >= 0)."""
    val = load_split(rt, "val")
    if 0 <= size < len(val):
        pick = np.random.default_rng(rt.config.seed + 17).choice(len(val), size, replace=False)
        val = [val[i] for i in sorted(pick)]
    return val


class Evaluator(StepRecords):
    """Held-out reward of a stage's model, appended to `<stage>/eval.jsonl` and logged."""

    def __init__(self, rt: Runtime, stage: Stage, policy: Any, logger: Any, section: Any):
        super().__init__(stage.file("eval.jsonl"))
        self.rt, self.stage, self.policy, self.logger, self.section = rt, stage, policy, logger, section
        self.val = eval_subset(rt, section.eval_size)
        self.cfg = reward_config(rt.config)

    def __call__(self, step: int, params: Any) -> dict[str, Any]:
        s = self.section
        res = evaluate(self.policy, params, self.val, self.rt.embedder, self.cfg, samples=s.eval_samples,
                       temperature=s.eval_temperature, seed=self.rt.config.seed,
                       num_examples=self.rt.config.logging.num_sample_texts)
        examples = res.pop("examples")
        self.append({"step": step, **res})
        self.logger.scalars(step, {k: v for k, v in res.items() if isinstance(v, float)}, prefix="eval/")
        if examples:
            self.logger.samples_table(step, "eval/predictions", examples)
        log.info("%s step %d: held-out world-model reward %.3f (unparsable %.2f, truncated %.2f)", self.stage.name,
                 step, res["mean_reward"], res["unparsable"], res["truncated"])
        return res


def wm_scorer(rt: Runtime, triplets: list[Triplet], group_size: int, cfg: RewardConfig, realized: EmbeddingCache,
              judge: JudgeReward | None = None):
    """The `score` of `grpo_iteration` for `group_size` predictions of each triplet (prompt by prompt): the
    training reward `rewards.kind` selects — sim-to-real rewards against the realised next states, or the
    LLM judge's (`judge`; real-valued, or binarised when rewards.judge_binary) — with the unparsable and
    truncated (cut at rwml.max_new_tokens) fractions."""

    def fn(completions: list[Completion]) -> tuple[np.ndarray, dict[str, float]]:
        texts = [x.text for x in completions]
        extra = {"truncated": float(np.mean([x.truncated for x in completions]))}
        if judge is not None:
            rewards, st = judge.scores(texts, [t.next_state for t in triplets for _ in range(group_size)])
            if rt.config.rewards.judge_binary:
                rewards = judge.binarize(rewards)
            return rewards, {**extra, "unparsable": st["unparsable"] / st["n"],
                             "judge_unparsable": st["judge_unparsable"] / st["n"]}
        rb = score(texts, triplets, rt.embedder, cfg, repeat=group_size, realized_cache=realized)
        return rb.rewards, {**extra, "unparsable": float(rb.stats["unparsable"] / rb.stats["n"])}

    return fn


def update_config(r: Any, mesh: Any) -> GRPOConfig:
    """The GRPO update of the `rwml` config section `r` on `mesh`: its loss options, and prompts shared by
    groups and micro-batches as far as the mesh allows (`rl.shared_prompt.micro_batching`)."""
    G = r.group_size
    share, micro = 0, (r.micro_batch_size if r.micro_batch_size < r.batch_prompts * G else None)
    if r.share_prompts:
        share, micro = micro_batching(r.batch_prompts, G, r.micro_batch_size, batch_size_multiple(mesh))
    return GRPOConfig(clip_eps_low=r.clip_eps_low, clip_eps_high=r.clip_eps_high, kl_coef=r.kl_coef,
                      kl_estimator=r.kl_estimator, loss_agg=r.loss_agg, micro_batch_size=micro, prompt_group_size=share,
                      router_aux_loss_coef=r.router_aux_loss_coef, temperature=r.temperature)


def training_judge(rt: Runtime) -> JudgeReward | None:
    """The LLM judge when rewards.kind == "judge" (the paper's ablation), else None (embedding reward)."""
    r = rt.config.rewards
    if r.kind != "judge":
        return None
    return JudgeReward(judge_generator(rt), binary_threshold=r.judge_threshold)


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    c = rt.config
    r = c.rwml
    G = r.group_size
    stage = Stage(rt.work_dir, "rwml")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    train = final_train_set(rt)
    source = rt.policy_source()
    model_config, start_params = rt.load_model(source)
    tokenizer = rt.tokenizer()
    policy = PolicySampler(model_config, tokenizer, rt.mesh, max_prompt_tokens=r.max_prompt_tokens,
                           max_new_tokens=r.max_new_tokens, weight_format=rt.execution(model_config).weight_format)
    cfg = reward_config(c)
    judge = training_judge(rt)
    realized = realized_cache(rt.work_dir, rt.embedder, cfg)
    if judge is None:
        realized.warm([t.next_state for t in train])

    total = num_steps(len(train), r.batch_prompts, r.epochs, r.max_steps)
    opt = OptimizerConfig(learning_rate=r.learning_rate, warmup_steps=r.warmup_steps, weight_decay=r.weight_decay,
                          max_grad_norm=r.max_grad_norm, b1=c.optimizer.b1, b2=c.optimizer.b2, eps=c.optimizer.eps,
                          state_dtype=c.optimizer.state_dtype)
    loop = TrainLoop(stage.path, rt.mesh, model_config, opt, len(train), r.batch_prompts, total, c.seed,
                     every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep)
    grpo_cfg = update_config(r, rt.mesh)
    if grpo_cfg.prompt_group_size:
        log.info("rwml: prompts shared by groups of %d rows, micro-batches of %s sequences (rwml.micro_batch_size=%d)",
                 grpo_cfg.prompt_group_size, grpo_cfg.micro_batch_size or r.batch_prompts * G, r.micro_batch_size)
    step_fn = make_grpo_step(model_config, grpo_cfg, loop.optimizer, rt.mesh, execution=rt.execution(model_config))
    ref_params = start_params if grpo_cfg.uses_reference else None

    def sample(params: Any, prompt_ids: list[list[int]], n: int, seed: int) -> list[Completion]:
        return policy.sample_ids(params, prompt_ids, n=n, temperature=r.temperature, top_p=r.top_p, seed=seed)

    state, cursor, first = loop.start(lambda: start_params)
    logger = MetricsLogger.for_stage(stage.path, c, resume_step=first or None)
    evaluator = Evaluator(rt, stage, policy, logger, r)
    evaluator.truncate(first)
    if first == 0:
        evaluator(0, state.params)
    bar = progress(total, "rwml", initial=first)
    try:
        for step, idx, key in loop.steps(cursor, first):
            batch_t = [train[i] for i in idx]
            seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
            state, metrics, _ = grpo_iteration(
                state, [policy.encode(wm_messages(t)) for t in batch_t], sample=sample,
                score=wm_scorer(rt, batch_t, G, cfg, realized, judge), group_size=G, step_fn=step_fn,
                pad_id=tokenizer.pad_token_id, completion_len=r.max_new_tokens, seed=seed,
                normalize_std=r.normalize_std, prompt_multiple=128, ref_params=ref_params)
            if (step + 1) % c.logging.log_every == 0:
                logger.scalars(step + 1, metrics, prefix="train/")
            done = step + 1
            if done % r.eval_every == 0 or done == total:
                evaluator(done, state.params)
            loop.maybe_save(done, state, cursor, force=done == total)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", kl=f"{metrics.get('ref_kl', 0.0):.3f}")
    finally:
        bar.close()
        loop.close()
        logger.flush()

    save_pretrained(model_config, state.params, stage.file("model"), tokenizer=tokenizer)
    evals = evaluator.records()
    plot_reward_curve(stage.file("reward_curve.png"),
                      {"rwml": ([e["step"] for e in evals], [e["mean_reward"] for e in evals])},
                      title=f"{c.name}: held-out world-model reward")
    logger.image(total, "rwml/reward_curve", stage.file("reward_curve.png"))
    logger.close()
    summary = {
        "steps": total, "train_triplets": len(train), "eval_triplets": len(evaluator.val),
        "reward_before": evals[0]["mean_reward"], "reward_after": evals[-1]["mean_reward"],
        "by_action": {k: {"n": evals[-1].get(f"{k}/n"), "before": evals[0].get(f"{k}/mean_reward"),
                          "after": evals[-1].get(f"{k}/mean_reward")} for k in ("valid_action", "invalid_action")},
        "eval_curve": [(e["step"], e["mean_reward"]) for e in evals],
    }
    stage.finish(c, summary=summary, outputs=["model/config.json", "eval.jsonl", "reward_curve.png"])
    return summary
