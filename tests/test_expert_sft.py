"""The `expert_sft` stage (imitation learning on expert trajectories): it runs on generated ALFWorld games
and its model plays the expert's actions on the training games; τ² gold conversations become SFT turns of
real τ² tasks, in the rollout's prompt format."""

from __future__ import annotations

import pytest

from rwml_jax.agent.parse import parse_alfworld_action, tau2_agent_action
from rwml_jax.config import load_config
from rwml_jax.train.expert_data import EMPTY_THINK, gold_conversation_turns
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.run import run_stages
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.stage_io import Stage, read_json, stage_deps
from rwml_jax.train.stages.expert_sft import expert_turns


def _greedy_matches(rt: Runtime, model_dir: str, turns: list) -> float:
    """Fraction of expert turns whose action the model at `model_dir` reproduces with greedy decoding."""
    c = rt.config
    model_config, params = rt.load_model(model_dir)
    policy = PolicySampler(model_config, rt.tokenizer(), rt.mesh, max_prompt_tokens=c.collect.max_prompt_tokens,
                           max_new_tokens=c.collect.max_new_tokens)
    outs = policy.generate_fn(params, temperature=0.0, seed=0)([msgs for msgs, _ in turns])
    hits = [parse_alfworld_action(o["text"], []).action == parse_alfworld_action(t, []).action
            for o, (_, t) in zip(outs, turns)]
    return sum(hits) / len(hits)


def test_expert_sft_imitates_the_walkthroughs_of_the_training_games(tmp_path):
    pytest.importorskip("alfworld", reason="needs the alfworld package")
    work = tmp_path / "run"
    config = load_config("demo_cpu:smoke", [
        f"--config.work_dir={work}", "--config.stages=('warmstart', 'expert_sft')",
        "--config.warmstart.num_games=4", "--config.warmstart.steps=2", "--config.env.num_generated_games=4",
        "--config.expert_sft.epochs=30", "--config.expert_sft.steps=60", "--config.expert_sft.learning_rate=3e-3",
        "--config.expert_sft.batch_size=8",
        "--config.expert_sft.micro_batch_size=8", "--config.expert_sft.warmup_steps=5",
        "--config.checkpoint.every_steps=30",
    ])
    assert stage_deps(config, "expert_sft").get("warmstart.steps") == 2  # it reads the warm-start model ...
    assert "collect.temperature" not in stage_deps(config, "expert_sft")  # ... not the collect stage's output
    s = run_stages(config)["expert_sft"]
    assert s["tasks"] == 4 and s["successes"] == 4  # every walkthrough wins its game
    assert s["examples"] == s["turns"] >= 4 * 3
    assert s["final_loss"] < 0.3 * s["first_loss"], s

    rt = Runtime(config)
    turns, counts = expert_turns(rt, Stage(rt.work_dir, "expert_sft"))
    assert counts == {"tasks": 4, "successes": 4, "turns": s["turns"]}
    before = _greedy_matches(rt, str(work / "warmstart" / "model"), turns)
    after = _greedy_matches(rt, str(work / "expert_sft" / "model"), turns)
    assert after >= 0.15 and after > before + 0.1, (before, after)  # 60 steps: 0.00 -> 0.23 here
    done = read_json(work / "expert_sft" / "DONE.json")
    assert done["upstream"] == {"warmstart": read_json(work / "warmstart" / "DONE.json")["run_id"]}
    assert run_stages(config, ("expert_sft",))["expert_sft"]["final_loss"] == s["final_loss"]  # reused, not rerun


def test_tau2_gold_conversations_become_sft_turns_of_real_tasks():
    pytest.importorskip("tau2", reason="needs the tau2 package")
    from rwml_jax.envs.base import TaskSpec
    from rwml_jax.envs.tau2_env import list_task_ids, load_tasks
    from rwml_jax.envs.tau2_gold import gold_script

    tasks = [TaskSpec("tau2", "train", tid, options=(("domain", d),))
             for d in ("airline", "retail", "telecom") for tid in list_task_ids(d, "train")[:1]]
    turns, counts = gold_conversation_turns(tasks, max_steps=30, num_workers=2)
    assert counts["tasks"] == 3 and counts["successes"] == 3  # τ²'s evaluator scores each gold conversation 1.0
    gold = [g for t in tasks for g in gold_script(load_tasks(dict(t.options)["domain"], "train")[t.task_id])[0]]
    assert [target for _, target in turns] == [EMPTY_THINK + g for g in gold]
    assert counts["turns"] == len(gold)
    n_calls = 0
    for msgs, target in turns:
        assert msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"] and msgs[-1]["role"] in ("user", "tool")
        parsed = tau2_agent_action(target)
        assert parsed.format_ok and parsed.has_think and parsed.action == target[len(EMPTY_THINK):].strip()
        n_calls += "<tool_call>" in target
    assert n_calls >= 3
    # the prompt of each later turn holds the earlier gold turns as the assistant's messages
    first_task = [m for m, _ in turns][: len(gold_script(load_tasks("airline", "train")[tasks[0].task_id])[0])]
    if len(first_task) > 1:
        said = [m["content"] for m in first_task[-1] if m["role"] == "assistant"]
        assert all(g.strip() in said for g in gold[: len(first_task) - 1])
