"""The rwml stage's training reward as `rewards.*` selects it: the LLM-judge ablation changes the rewards GRPO
trains on, and the authors' scripts' reward details change them as the config says (real embedder, real sampler)."""

import numpy as np
import pytest

from rwml_jax.config import load_config
from rwml_jax.rwml.judge import JudgeReward
from rwml_jax.rwml.triplets import Triplet
from rwml_jax.train.policy import Completion
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.stages.rwml import training_judge, wm_scorer
from rwml_jax.train.wm_eval import realized_cache, reward_config

REAL = ["You arrive at countertop 1. On the countertop 1, you see a apple 1, and a knife 2.",
        "The drawer 2 is open. In it, you see nothing."]
G = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rwml_jax.models import save_pretrained
    from rwml_jax.sampling.tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("policy")
    tok = tiny_tokenizer(path)
    cfg, params = tiny_model(tok)
    save_pretrained(cfg, params, path, tokenizer=tok)
    return str(path)


def _runtime(tmp_path, model_dir, *overrides):
    config = load_config("rwml_alfworld", [f"--config.work_dir={tmp_path}", f"--config.model.path={model_dir}",
                                           "--config.model.compute_dtype=float32", "--config.embedder.path=minilm",
                                           "--config.embedder.dtype=float32", "--config.mesh.fsdp=1",
                                           "--config.mesh.data=1", *overrides])
    return Runtime(config)


def _triplets():
    return [Triplet(id=f"ep:{i}", env="alfworld", kind="observation", task="put a apple in a box.", history=(),
                    state="You are in the middle of a room.", state_kind="observation", action=f"go to place {i}",
                    next_state=real, valid=True, episode_id="ep", step=i, task_id="t", task_split="train")
            for i, real in enumerate(REAL)]


def _completions(texts):
    return [Completion(ids=[1, 2], logprobs=np.zeros(2, np.float32), text=t) for t in texts]


def _train_rewards(rt, completions, judge=None):
    cfg = reward_config(rt.config)
    score = wm_scorer(rt, _triplets(), G, cfg, realized_cache(rt.work_dir, rt.embedder, cfg), judge)
    return score(completions)


def test_judge_reward_changes_what_rwml_trains_on(tmp_path, model_dir):
    # exact copies of the real next states: the embedding reward is 1 for each of the G samples
    outs = [f"<think>I go there.</think><next_state>{r}</next_state>" for r in REAL for _ in range(G)]
    rt = _runtime(tmp_path / "emb", model_dir)
    assert training_judge(rt) is None
    emb, emb_extra = _train_rewards(rt, _completions(outs))
    np.testing.assert_array_equal(emb, np.ones(len(outs)))
    assert "judge_unparsable" not in emb_extra

    # the judge ablation: a local judge (a random preset model with the policy's tokenizer) served by the
    # project's sampler; it never answers <score>N</score>, so every sample scores 0 and is counted
    rt = _runtime(tmp_path / "judge", model_dir, "--config.rewards.kind=judge", "--config.rewards.judge=local:micro",
                  "--config.rewards.judge_max_new_tokens=8")
    judge = training_judge(rt)
    assert isinstance(judge, JudgeReward)
    rewards, extra = _train_rewards(rt, _completions(outs), judge)
    np.testing.assert_array_equal(rewards, np.zeros(len(outs)))
    assert extra["judge_unparsable"] == 1.0 and extra["unparsable"] == 0.0

    # a judge that answers: real-valued (score / 10) or binarised at rewards.judge_threshold, as configured
    answering = JudgeReward(lambda chats: ["<score>6</score>"] * len(chats), binary_threshold=0.7)
    real_valued, _ = _train_rewards(_runtime(tmp_path / "rv", model_dir, "--config.rewards.kind=judge",
                                             "--config.rewards.judge=local:micro", "--config.rewards.judge_binary=False"),
                                    _completions(outs), answering)
    np.testing.assert_allclose(real_valued, 0.6)
    binary, _ = _train_rewards(rt, _completions(outs), answering)
    np.testing.assert_array_equal(binary, np.zeros(len(outs)))


def test_scripts_reward_details_act_on_the_training_reward(tmp_path, model_dir):
    short = [f"<think>ok</think><next_state>{r}</next_state>" for r in REAL for _ in range(G)]
    long_think = [f"<think>{'I think about the room and the object. ' * 4}</think><next_state>{r}</next_state>"
                  for r in REAL for _ in range(G)]
    rt = _runtime(tmp_path / "plain", model_dir)
    plain, _ = _train_rewards(rt, _completions(short))
    rt = _runtime(tmp_path / "think", model_dir, "--config.rewards.think_penalty=0.1")
    penalised, _ = _train_rewards(rt, _completions(short))
    kept, _ = _train_rewards(rt, _completions(long_think))
    np.testing.assert_allclose(penalised, plain - 0.1)
    np.testing.assert_allclose(kept, plain)
    # the real state embedded as a query with the scripts' instruction: distances change, rewards need not
    cfg = reward_config(_runtime(tmp_path / "inst", model_dir, "--config.rewards.realized_instruction=scripts").config)
    assert cfg.realized_instruction.startswith("Given a reference text")
    assert realized_cache(tmp_path, rt.embedder, cfg).prompt.startswith("Instruct: Given a reference text")
