"""The paper's ablations (and the authors' scripts' settings) as recipe variants: ``RECIPE:VARIANT[+VARIANT...]``.

    rwml-jax run rwml_alfworld:judge           # RWML trained on an LLM judge's reward (reward hacking)
    rwml-jax run rwml_tau2:scripts+history5    # variants combine with "+"

Each variant writes to its own work_dir (``<recipe work_dir>_<variant>``) and name, so runs never mix.
"""

from __future__ import annotations

import re

import ml_collections

# variant -> what it changes (README lists these)
VARIANTS: dict[str, str] = {
    "arms": "every arm of Table 1 in one work dir: base, WM-SFT, RWML, imitation (expert_sft), and policy RL "
            "from the base, WM-SFT and RWML models (stage instances policy_rl@<init>), all evaluated and compared",
    "judge": "rwml trained on an LLM judge's reward (rewards.kind=judge; judge = the base model, served locally)",
    "wm_sft": "the WM-SFT baseline alone: next-state SFT on the final triplets, no GRPO",
    "no_filter": "no easy-sample filtering (filter.enabled=False)",
    "keep_invalid": "keep triplets of invalid actions (triplets.drop_invalid=False)",
    "history<N>": "N (state, action) pairs of history in the world-model prompt (triplets.history_length=N)",
    "scripts": "the authors' public scripts' values where the paper is silent (see the recipe's comments)",
}


def scripts_alfworld(c: ml_collections.ConfigDict) -> None:
    """The authors' ALFWorld RWML script: embedder query instruction, 128 prediction tokens, KL 0.001, prompt
    <= 1,500 tokens (their 4 epochs are not taken: the paper says 2)."""
    c.rewards.realized_instruction = "scripts"
    c.rewards.prediction_max_tokens = 128
    c.rwml.kl_coef = 0.001
    c.rwml.max_prompt_tokens = 1536


def scripts_tau2(c: ml_collections.ConfigDict) -> None:
    """The authors' τ² RWML script: query instruction, 512 prediction tokens, thinking penalty 0.1, task-status
    term 0.5 (their variant), ROUGE with stemming, history 5, G = 8, KL 0.001, long responses."""
    c.rewards.realized_instruction = "scripts"
    c.rewards.prediction_max_tokens = 512
    c.rewards.think_penalty = 0.1
    c.rewards.think_min_tokens = 16
    c.triplets.ask_task_status = True
    c.rewards.status_penalty = 0.5
    c.rewards.rouge_stemmer = True
    c.triplets.history_length = 5
    c.rwml.group_size = 8
    c.rwml.kl_coef = 0.001
    c.rwml.max_new_tokens = 8192
    c.rwml.max_prompt_tokens = 10240
    c.filter.max_new_tokens = 8192
    c.env.max_steps = 60


def apply(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """`c` with the "+"-separated variants of `arg` applied (None / "" / "default": unchanged)."""
    if arg in (None, "", "default"):
        return c
    for v in arg.split("+"):
        m = re.fullmatch(r"history(\d+)", v)
        if v == "judge":
            c.rewards.kind = "judge"
            c.rewards.judge = f"local:{c.model.path or c.model.preset}"
            c.stages = tuple(s for s in c.stages if s != "wm_sft")
        elif v == "wm_sft":
            c.stages = tuple(s for s in c.stages if s != "rwml")
            if c.policy_rl.init == "rwml":
                c.policy_rl.init = "wm_sft"
        elif v == "no_filter":
            c.filter.enabled = False
        elif v == "keep_invalid":
            c.triplets.drop_invalid = False
        elif m:
            c.triplets.history_length = int(m.group(1))
        elif v == "arms":
            arms(c)
        elif v == "scripts":
            (scripts_tau2 if c.env.name == "tau2" else scripts_alfworld)(c)
        else:
            raise ValueError(f"unknown variant {v!r}; expected one of {', '.join(VARIANTS)} (joined with '+')")
    suffix = arg.replace("+", "_")
    c.name = f"{c.name}_{suffix}"
    c.work_dir = f"{c.work_dir}_{suffix}"
    return c


def arms(c: ml_collections.ConfigDict) -> None:
    """Every arm of the paper's Table 1 in one work dir: the RWML, WM-SFT and imitation (expert_sft) models,
    policy RL from the base, WM-SFT and RWML models (stage instances policy_rl@<init>, one folder each), then
    every model evaluated and compared."""
    inits = ("base", "wm_sft", "rwml")
    trained = [s for s in c.stages if s in ("collect", "triplets", "filter", "rwml")]
    c.stages = (*trained, "wm_sft", "expert_sft", *[f"policy_rl@{i}" for i in inits], "eval")
    c.eval.models = ("base", "wm_sft", "rwml", "expert_sft", *[f"policy_rl@{i}" for i in inits])
