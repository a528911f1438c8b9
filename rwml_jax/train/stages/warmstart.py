"""The CPU demo's `warmstart` stage: a tokenizer and a tiny model trained from scratch, honestly.

No pretrained weights can be downloaded on the demo machine, so this stage builds the "base model" the
paper takes from the hub:

1. generates `warmstart.num_games` ALFWorld games (a seed disjoint from the collect games) and replays
   their expert walkthroughs through the real engine (worker pool), interleaving side actions that leave
   the plan intact with probability `warmstart.probe_prob` (failed, looking and detour actions);
2. trains a byte-level BPE tokenizer with a ChatML template on the replayed text and the prompts;
3. trains a `model.preset` Qwen3-architecture model from random init, by SFT on two kinds of turns from
   those replays: ReAct policy turns of the expert steps (prompt -> `<think> </think><action>a</action>`,
   each `warmstart.policy_repeat` times) and world-model turns of every step (prompt ->
   `<think> </think><next_state>s'</next_state>`);
4. saves it as a Hugging Face folder (`warmstart/model`) that every later stage loads like a hub model.
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
from rwml_jax.train.expert_data import encode_turns, policy_turns, replay_walkthroughs
from rwml_jax.train.metrics_log import MetricsLogger
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.sft_loop import examples_stats, train_sft
from rwml_jax.train.stage_io import Stage, write_jsonl

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("seed", "model", "warmstart", "optimizer", "collect.history_length", "env.name", "env.data_dir",
               "env.num_generated_games", "env.max_steps")

log = logging.getLogger(__name__)

WARMSTART_SEED_OFFSET = 10_007  # warm-start games never share a seed with the collect games


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
    turns = [t for e in episodes for t in policy_turns(e, c.collect.history_length)]
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
    params, metrics = train_sft(
        stage_dir=stage.path, mesh=rt.mesh, model_config=model_config, init_params=init_params,
        examples=examples, learning_rate=w.learning_rate, epochs=w.epochs, batch_size=w.batch_size,
        micro_batch_size=w.micro_batch_size, warmup_steps=w.warmup_steps, seed=c.seed, pad_id=tokenizer.pad_token_id,
        max_steps=w.steps, optimizer=c.optimizer, checkpoint_every=c.checkpoint.every_steps, keep=c.checkpoint.keep,
        logger=logger, desc="warmstart", execution=rt.execution(model_config), schedule=w.schedule,
    )
    logger.close()
    save_pretrained(model_config, params, tok_dir, tokenizer=tokenizer)
    summary = {
        "games": len(episodes), "walkthrough_wins": wins, "probe_transitions": probes, "policy_turns": len(turns),
        "world_model_turns": len(wm_turns), "params": model_config.num_params,
        "final_loss": metrics.get("loss", float("nan")), "tokens_mean": float(np.mean([len(a) + len(b) for a, b in examples])),
    }
    stage.finish(c, summary=summary, outputs=["model/config.json", "model/model.safetensors"])
    return summary

