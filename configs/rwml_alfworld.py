"""RWML on ALFWorld with Qwen2.5-7B-Instruct: the paper's recipe (Yu et al. 2026, docs/method.md).

    rwml-jax run rwml_alfworld --config.work_dir=gs://bucket/runs/alfworld
    rwml-jax run rwml_alfworld --dry-run          # print the plan only

Stage 0: the model itself rolls out N = 3 trajectories on each of the 2048 training games (temperature 1.0,
at most 30 steps); every turn is a triplet (paper: 21,011 train / 2,288 validation). Stage 1: a filter model
SFT'd on the validation split keeps easy triplets (all K = 10 samples within distance 0.1) with p = 0.1
(paper: 15,813 left). Stage 2: GRPO, 2 epochs, lr 1e-6, 32 prompts x G = 8, reward 1[1 - cos < 0.2] under
Qwen3-Embedding-8B.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: None (RWML, then policy RL from the RWML model) or "arms" (every arm of Table 1, see `arms`)."""
    c = base.get_config()
    c.name = "rwml_alfworld"
    c.work_dir = "runs/rwml_alfworld"
    c.stages = ("collect", "triplets", "filter", "rwml", "wm_sft", "expert_sft")

    c.model.path = "Qwen/Qwen2.5-7B-Instruct"
    c.embedder.path = "Qwen/Qwen3-Embedding-8B"
    c.embedder.max_length = 512

    # 8 accelerators (paper: 2-8 B200): parameters and optimiser state sharded 8 ways.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.env.name = "alfworld"
    c.env.data_dir = ""  # $ALFWORLD_DATA (alfworld-download)
    c.env.split = "train"
    c.env.max_steps = 30  # paper

    c.collect.num_tasks = 2048  # paper: 2048 training tasks
    c.collect.trajectories_per_task = 3  # paper: N = 3
    c.collect.temperature = 1.0

    c.triplets.history_length = 2
    c.triplets.drop_invalid = True
    c.triplets.mask_tool_schema = False  # no tool responses in ALFWorld

    c.filter.num_samples = 10
    c.filter.threshold_observation = 0.1  # paper: ALFWorld filter threshold
    c.filter.keep_easy_prob = 0.1

    c.rwml.group_size = 8  # paper: ALFWorld G = 8
    c.rewards.threshold_observation = 0.2  # paper: ALFWorld training threshold

    # The imitation-learning arm (Table 1): SFT of the base model on the expert walkthroughs of the same
    # training games; paper silent on its settings: WM-SFT's (base.py).
    c.expert_sft.learning_rate = 2e-6
    c.expert_sft.epochs = 2

    # Evaluation (paper): ID = valid_seen (140 games), OOD = valid_unseen (134), at most 30 steps, 3 runs.
    # Append "eval" to `stages` (or run `rwml-jax eval RECIPE`) to score the last stage's model.
    c.eval.splits = ("valid_seen", "valid_unseen")
    c.eval.max_steps = 30
    c.eval.runs = 3

    # Stage 3, policy RL on task success (paper: 300 steps, G = 8, at most 15 steps per training episode,
    # from the RWML checkpoint for "RWML + Policy RL"); the rest are configs/base.py's verl-agent defaults.
    c.stages = (*c.stages, "policy_rl")
    c.policy_rl.init = "rwml"
    c.policy_rl.steps = 300  # paper
    c.policy_rl.group_size = 8  # paper
    c.policy_rl.max_episode_steps = 15  # paper: 15 in training (30 in evaluation)
    c.policy_rl.batch_tasks = 16  # verl-agent ALFWorld (paper silent)
    return arms(c) if arg == "arms" else c


def arms(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every arm of the paper's Table 1 in one work dir: policy RL from the base model, from WM-SFT and
    from RWML (stage instances policy_rl@<init>, one folder each), then every model evaluated and compared.
    The imitation row is the expert_sft model itself (policy_rl@expert_sft can be added as a further arm)."""
    c.name = f"{c.name}_arms"
    c.work_dir = f"{c.work_dir}_arms"
    inits = ("base", "wm_sft", "rwml")
    c.stages = (*[s for s in c.stages if s != "policy_rl"], *[f"policy_rl@{i}" for i in inits], "eval")
    c.eval.models = ("base", "wm_sft", "rwml", "expert_sft", *[f"policy_rl@{i}" for i in inits])
    return c
