"""Stage 5, `wm_sft`: the next-state SFT baseline on the same final triplet set as RWML.

Token-level SFT on `<think> </think><next_state>s'</next_state>` (paper: lr 2e-6, 2 epochs), evaluated
with exactly RWML's held-out reward (same validation triplets, same greedy decoding). Output:
`wm_sft/model`, `wm_sft/eval.jsonl`.
"""

from __future__ import annotations

from typing import Any

from rwml_jax.models.hf_io import save_pretrained
from rwml_jax.train.metrics_log import MetricsLogger
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.sft_loop import fit_batch, train_sft
from rwml_jax.train.stage_io import Stage
from rwml_jax.train.stages.filter import final_train_set
from rwml_jax.train.stages.rwml import Evaluator
from rwml_jax.train.wm_eval import sft_examples

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("wm_sft", "rwml.max_prompt_tokens", "rwml.max_new_tokens", "rwml.eval_size", "rwml.eval_samples",
               "rwml.eval_temperature", "rewards", "embedder", "optimizer")
# Of those, the ones that change speed or memory but not the output (fnmatch patterns).
IGNORED_KEYS = ("embedder.batch_size",)


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    c = rt.config
    s = c.wm_sft
    stage = Stage(rt.work_dir, "wm_sft")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    train = final_train_set(rt)
    model_config, start = rt.load_model()
    tokenizer = rt.tokenizer()
    policy = PolicySampler(model_config, tokenizer, rt.mesh, max_prompt_tokens=c.rwml.max_prompt_tokens,
                           max_new_tokens=c.rwml.max_new_tokens, weight_format=rt.execution(model_config).weight_format)
    logger = MetricsLogger.for_stage(stage.path, c)
    evaluator = Evaluator(rt, stage, policy, logger, c.rwml)  # the same held-out set and decoding as RWML
    if not evaluator.records():
        evaluator(0, start)
    examples = sft_examples(policy, train, c.rwml.max_new_tokens)
    batch = fit_batch(s.batch_size, len(examples), rt.mesh)
    params, metrics = train_sft(
        stage_dir=stage.path, mesh=rt.mesh, model_config=model_config, init_params=lambda: start,
        examples=examples, learning_rate=s.learning_rate, epochs=s.epochs, batch_size=batch,
        micro_batch_size=s.micro_batch_size, warmup_steps=s.warmup_steps, seed=c.seed, pad_id=tokenizer.pad_token_id,
        optimizer=c.optimizer, checkpoint_every=c.checkpoint.every_steps, keep=c.checkpoint.keep, logger=logger,
        desc="wm_sft", execution=rt.execution(model_config),
    )
    steps = len(examples) // batch * s.epochs
    final = evaluator(steps, params)
    save_pretrained(model_config, params, stage.file("model"), tokenizer=tokenizer)
    logger.close()
    evals = evaluator.records()
    summary = {"steps": steps, "train_triplets": len(train), "reward_before": evals[0]["mean_reward"],
               "reward_after": final["mean_reward"], "final_loss": metrics.get("loss")}
    stage.finish(c, summary=summary, outputs=["model/config.json", "eval.jsonl"])
    return summary
