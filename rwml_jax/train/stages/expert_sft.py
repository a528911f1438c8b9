"""Stage `expert_sft`: imitation learning on expert trajectories (the imitation-learning row of Table 1).

The expert data of the recipe's training tasks (the collect stage's tasks, `rwml_jax.train.stages.collect.
training_tasks`), replayed through the real environments (`rwml_jax.train.expert_data`):

* ALFWorld: every training game's expert walkthrough, played through the engine; one SFT example per expert
  step: the ReAct prompt the rollout builds (task, last `collect.history_length` steps, observation,
  admissible commands) -> `<think> </think><action>a</action>`;
* τ²: every training task's gold conversation (its gold actions against the scripted gold user), kept when
  τ²'s evaluator scores it 1.0; one example per agent turn: system prompt + tools + conversation so far ->
  `<think> </think>` + the gold turn (tool call, message to the user, closing message).

Prompts are truncated as the policy's sampler truncates them (`collect.max_prompt_tokens`, completions to
`collect.max_new_tokens`); loss on completion tokens only (`rwml_jax.train.sft_loop`). Starts from the
recipe's start model (`model.path`, or the warm-start model); resumable through its checkpoints. Outputs:
`expert_sft/model` (Hugging Face folder), `expert_sft/corpus_stats.jsonl`, metrics.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rwml_jax.models.hf_io import save_pretrained
from rwml_jax.train.expert_data import encode_turns, gold_conversation_turns, policy_turns, replay_walkthroughs
from rwml_jax.train.metrics_log import MetricsLogger, read_metrics, series
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.sft_loop import examples_stats, train_sft
from rwml_jax.train.stage_io import Stage, write_jsonl
from rwml_jax.train.stages.collect import training_tasks

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("seed", "model", "env.name", "env.data_dir", "env.split", "env.num_generated_games", "env.task_types",
               "env.domains", "env.max_steps", "collect.num_tasks", "collect.history_length",
               "collect.max_prompt_tokens", "collect.max_new_tokens", "expert_sft", "optimizer")

log = logging.getLogger(__name__)


def expert_turns(rt: Runtime, stage: Stage) -> tuple[list, dict[str, Any]]:
    """(policy turns of the expert trajectories of the training tasks, counts)."""
    c = rt.config
    tasks, _, kwargs = training_tasks(rt, stage.local_folder("games"))
    workers = c.env.num_workers or os.cpu_count() or 1
    if c.env.name == "alfworld":
        # a walkthrough is as long as it is: the step limit must not cut it
        episodes = replay_walkthroughs(kwargs["data_dir"], [t.task_id for t in tasks], workers, split=c.env.split,
                                       seed=c.seed)
        wins = sum(1 for e in episodes if e and e[-1].reward > 0)
        turns = [t for e in episodes if e and e[-1].reward > 0 for t in policy_turns(e, c.collect.history_length)]
        return turns, {"tasks": len(tasks), "successes": wins, "turns": len(turns)}
    return gold_conversation_turns(tasks, max_steps=c.env.max_steps, num_workers=workers, seed=c.seed)


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    c = rt.config
    s = c.expert_sft
    stage = Stage(rt.work_dir, "expert_sft")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    turns, counts = expert_turns(rt, stage)
    if not turns:
        raise RuntimeError(f"expert_sft: no successful expert trajectory among {counts['tasks']} training tasks")
    log.info("expert_sft corpus: %s", counts)
    source = rt.policy_source()
    model_config, start = rt.load_model(source)
    tokenizer = rt.tokenizer()
    examples = encode_turns(tokenizer, turns, c.collect.max_prompt_tokens, c.collect.max_new_tokens)
    write_jsonl(stage.file("corpus_stats.jsonl"), [{**counts, **examples_stats(examples)}])
    batch = min(s.batch_size, len(examples))
    logger = MetricsLogger.for_stage(stage.path, c)
    params, metrics = train_sft(
        stage_dir=stage.path, mesh=rt.mesh, model_config=model_config, init_params=lambda: start,
        examples=examples, learning_rate=s.learning_rate, epochs=s.epochs, batch_size=batch,
        micro_batch_size=s.micro_batch_size, warmup_steps=s.warmup_steps, seed=c.seed, pad_id=tokenizer.pad_token_id,
        max_steps=s.steps, optimizer=c.optimizer, checkpoint_every=c.checkpoint.every_steps, keep=c.checkpoint.keep,
        logger=logger, desc="expert_sft", execution=rt.execution(model_config),
    )
    logger.close()
    save_pretrained(model_config, params, stage.file("model"), tokenizer=tokenizer)
    summary = {**counts, "start": source, "examples": len(examples), "first_loss": _first_loss(stage.path),
               "final_loss": metrics.get("loss", float("nan"))}
    stage.finish(c, summary=summary, outputs=["model/config.json", "model/model.safetensors"])
    return summary


def _first_loss(stage_dir: Any) -> float | None:
    """The first logged training loss: the start model's loss on the expert data."""
    _, losses = series(read_metrics(stage_dir), "expert_sft/loss")
    return losses[0] if losses else None
