"""The CPU demo's `warmstart` stage: a tokenizer and a tiny model trained from scratch, honestly.

No pretrained weights can be downloaded on the demo machine, so this stage builds the "base model" the
paper takes from the hub:

1. generates `warmstart.num_games` ALFWorld games of `env.task_types` (a seed disjoint from the collect
   games) and plays them
   through the real engine (worker pool) with the teacher `warmstart.corpus`: "walkthrough" replays each
   game's own plan, which goes straight to the hidden object; "explorer" (`rwml_jax.agent.explorer`)
   searches receptacle by receptacle, every action readable from its prompt. Side actions are
   interleaved with probability `warmstart.probe_prob` (failed, looking and detour actions);
2. trains a byte-level BPE tokenizer with a ChatML template on the replayed text and the prompts;
3. trains a `model.preset` Qwen3-architecture model from random init, by SFT on two kinds of turns from
   those replays: ReAct policy turns of the teacher's steps in won episodes (prompt -> `<think> </think><action>a</action>`,
   each `warmstart.policy_repeat` times) and world-model turns of every step (prompt ->
   `<think> </think><next_state>s'</next_state>`);
4. with `warmstart.dagger_rounds` > 0 (DAgger): the model plays the same games greedily, the explorer labels
   every state it reached (so it learns to carry on after its own mistakes), and SFT goes on for
   `warmstart.dagger_steps` on the corpus + those turns;
5. saves it as a Hugging Face folder (`warmstart/model`) that every later stage loads like a hub model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import jax
import numpy as np

from rwml_jax.envs.alfworld_gen import generate_games
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.decoder import init_params_sharded
from rwml_jax.models.hf_io import save_pretrained
from rwml_jax.models.tokenizer import train_tokenizer
from rwml_jax.rwml.triplets import triplets_from_episode
from rwml_jax.rwml.wm_prompts import wm_messages, wm_sft_target
from rwml_jax.train.expert_data import (TEACHERS, encode_turns, explorer_relabelled_turns, policy_turns,
                                        replay_walkthroughs)
from rwml_jax.train.metrics_log import MetricsLogger
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.sft_loop import examples_stats, train_sft
from rwml_jax.train.stage_io import Stage, write_jsonl

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("seed", "model", "warmstart", "optimizer", "collect.history_length", "env.name", "env.data_dir",
               "env.num_generated_games", "env.max_steps", "env.task_types", "collect.max_prompt_tokens",
               "collect.max_new_tokens")

log = logging.getLogger(__name__)

WARMSTART_SEED_OFFSET = 10_007  # warm-start games never share a seed with the collect games
EXPLORER_MAX_STEPS = 30  # an explorer episode not won by then is world-model data only
DAGGER_MAX_STEPS = 15  # turns of the model's own DAgger episodes (the paper's ALFWorld training episodes)


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    from configs.models import PRESETS

    c = rt.config
    w = c.warmstart
    if w.corpus not in TEACHERS:  # validation refuses others
        raise ValueError(f"warmstart.corpus={w.corpus!r}: expected one of {TEACHERS}")
    stage = Stage(rt.work_dir, "warmstart")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})

    games_dir = stage.local_folder("games")
    games = generate_games(games_dir, w.num_games, seed=c.seed + WARMSTART_SEED_OFFSET,
                           task_types=list(c.env.task_types) or None)
    episodes = replay_walkthroughs(os.fspath(games_dir), [g.folder for g in games], c.env.num_workers or os.cpu_count() or 1,
                                   probe_prob=w.probe_prob, seed=c.seed + WARMSTART_SEED_OFFSET, teacher=w.corpus,
                                   max_steps=EXPLORER_MAX_STEPS if w.corpus == "explorer" else 80)
    wins = sum(1 for e in episodes if e and e[-1].reward > 0)
    probes = sum(1 for e in episodes for t in e if t.info.get("probe"))
    # the policy imitates won episodes only; every step of every episode is world-model data
    turns = [t for e in episodes if e and e[-1].reward > 0 for t in policy_turns(e, c.collect.history_length)]
    wm_triplets = [t for e in episodes for t in triplets_from_episode(e, history_length=c.triplets.history_length)]
    wm_turns = [(wm_messages(t), wm_sft_target(t.next_state)) for t in wm_triplets]
    log.info("warmstart corpus: %d games (%d won), %d policy turns, %d world-model turns",
             len(episodes), wins, len(turns), len(wm_turns))

    tok_dir = stage.file("model")
    texts = [m["content"] for msgs, _ in turns + wm_turns for m in msgs] + [t for _, t in turns + wm_turns]
    preset = dict(PRESETS[c.model.preset])
    # trained into a folder of this process (save_pretrained below writes it into the shared model folder)
    tokenizer = train_tokenizer(texts, tempfile.mkdtemp(prefix="rwml-tok-"), vocab_size=min(w.tokenizer_vocab_size, preset["vocab_size"]))
    # policy turns repeated `policy_repeat` times: their ~10-token targets would else be a small share of the loss
    examples = encode_turns(tokenizer, turns * w.policy_repeat + wm_turns, w.seq_len, max_len=w.seq_len)
    write_jsonl(stage.file("corpus_stats.jsonl"), [examples_stats(examples)])

    preset.update(vocab_size=preset["vocab_size"], eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model_config = ModelConfig.from_hf_dict(preset, param_dtype=c.model.dtype, compute_dtype=c.model.compute_dtype)

    def init_params():
        return init_params_sharded(model_config, jax.random.key(c.seed), rt.mesh)

    logger = MetricsLogger.for_stage(stage.path, c)
    execution = rt.execution(model_config)

    def sft(folder, init, data, steps, desc):
        return train_sft(
            stage_dir=folder, mesh=rt.mesh, model_config=model_config, init_params=init,
            examples=data, learning_rate=w.learning_rate, epochs=w.epochs, batch_size=w.batch_size,
            micro_batch_size=w.micro_batch_size, warmup_steps=w.warmup_steps, seed=c.seed, pad_id=tokenizer.pad_token_id,
            max_steps=steps, optimizer=c.optimizer, checkpoint_every=c.checkpoint.every_steps, keep=c.checkpoint.keep,
            logger=logger, desc=desc, execution=execution, schedule=w.schedule,
        )

    params, metrics = sft(stage.path, init_params, examples, w.steps, "warmstart")
    dagger, rounds = [], []
    sampler = PolicySampler(model_config, tokenizer, rt.mesh, max_prompt_tokens=c.collect.max_prompt_tokens,
                            max_new_tokens=c.collect.max_new_tokens, weight_format=execution.weight_format)
    for r in range(1, w.dagger_rounds + 1):
        # the model's own greedy play, every state labelled by the explorer; SFT goes on with those turns added
        relabelled, counts = explorer_relabelled_turns(
            os.fspath(games_dir), [g.folder for g in games], sampler.generate_fn(params, temperature=0.0, seed=c.seed + r),
            num_workers=c.env.num_workers or os.cpu_count() or 1, history_length=c.collect.history_length,
            max_steps=DAGGER_MAX_STEPS, seed=c.seed + WARMSTART_SEED_OFFSET + r)
        rounds.append({"round": r, **counts})
        log.info("warmstart DAgger round %d: the model won %d of %d games; %d states relabelled (it agreed with the "
                 "explorer on %.0f %%)", r, counts["successes"], counts["episodes"], counts["turns"], 100 * counts["agreement"])
        dagger += encode_turns(tokenizer, relabelled * w.policy_repeat, w.seq_len, max_len=w.seq_len)
        params, metrics = sft(stage.path / f"dagger_{r}", lambda p=params: p, examples + dagger, w.dagger_steps,
                              f"warmstart_dagger{r}")
    logger.close()
    save_pretrained(model_config, params, tok_dir, tokenizer=tokenizer)
    summary = {
        "corpus": w.corpus, "games": len(episodes), "walkthrough_wins": wins, "probe_transitions": probes, "policy_turns": len(turns),
        "world_model_turns": len(wm_turns), "params": model_config.num_params,
        "dagger": rounds, "final_loss": metrics.get("loss", float("nan")), "tokens_mean": float(np.mean([len(a) + len(b) for a, b in examples])),
    }
    stage.finish(c, summary=summary, outputs=["model/config.json", "model/model.safetensors"])
    return summary

