"""The evaluation harness (`rwml_jax.evaluation`, `rwml-jax eval` / `compare`) against the real ALFWorld
engine and the real τ² package: reference policies from the command line, the arithmetic against
hand-computed cases, resume after SIGKILL, broken game files, a model checkpoint end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alfworld_testdata import DATA_SOURCES, generated_games, require_alfworld, valid_seen
from rwml_jax.evaluation.metrics import mean_std, pass_hat_k, summarize

REPO = Path(__file__).resolve().parents[1]
TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
         "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")


def cli(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "rwml_jax.cli", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"rwml-jax {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ arithmetic
def rec(run, task, group, success, steps=3, invalid=0, status="ok", reward=None, **kw):
    return {"run": run, "task_id": task, "group": group, "success": success, "steps": steps,
            "invalid_actions": invalid, "status": status,
            "reward": float(success) if reward is None else reward, **kw}


def test_alfworld_arithmetic_against_hand_computed_values():
    a, b = TYPES[0], TYPES[1]
    records = [
        # run 0: 2 of 3 won; run 1: 1 of 3 won
        rec(0, "g1", a, True, steps=4), rec(0, "g2", a, True, steps=6, invalid=1), rec(0, "g3", b, False, steps=10, invalid=5),
        rec(1, "g1", a, True, steps=8), rec(1, "g2", a, False, steps=10, invalid=2), rec(1, "g3", b, False, steps=10),
        # a crash in run 1 is left out of the rates; a broken game counts as a failure of both runs
        rec(1, "g4", b, False, steps=2, invalid=2, status="crashed"),
        rec(0, "g5", b, False, steps=0, status="load_error"), rec(1, "g5", b, False, steps=0, status="load_error"),
    ]
    s = summarize(records, runs=2, env="alfworld", groups=TYPES)
    o = s["overall"]
    assert o["success_per_run"] == [2 / 4, 1 / 4]
    assert o["success_mean"] == pytest.approx(0.375)
    assert o["success_std"] == pytest.approx(math.sqrt(2 * 0.125 ** 2))  # ddof=1 over the two runs
    assert o["crashed"] == 1 and o["load_errors"] == 2
    assert o["steps"] == 4 + 6 + 10 + 8 + 10 + 10
    assert o["invalid_action_rate"] == pytest.approx(8 / 48)
    assert o["mean_steps_success"] == pytest.approx((4 + 6 + 8) / 3)
    assert s["groups"][a]["success_per_run"] == [1.0, 0.5]
    assert s["groups"][a]["success_std"] == pytest.approx(math.sqrt(0.125))
    assert s["groups"][b]["success_per_run"] == [0.0, 0.0]
    assert list(s["groups"]) == [a, b]
    assert mean_std([0.5]) == (0.5, 0.0)


def test_pass_hat_k_is_tau2s_definition_on_a_hand_computed_case():
    d = "airline"
    ok = [("A", [1, 1, 1]), ("B", [1, 1, 0]), ("C", [0, 0, 0])]
    records = [rec(r, t, d, bool(x), tool_calls=2, invalid_tool_calls={"unparsable": 1, "unknown_tool": 0, "schema": 0})
               for t, xs in ok for r, x in enumerate(xs)]
    assert pass_hat_k(records, 1) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert pass_hat_k(records, 2) == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert pass_hat_k(records, 3) == pytest.approx(1 / 3)
    s = summarize(records, runs=3, env="tau2", groups=("airline", "retail", "telecom"))
    g = s["groups"][d]
    assert g["pass_hat_k"] == {"1": pytest.approx(5 / 9), "2": pytest.approx(4 / 9), "3": pytest.approx(1 / 3)}
    assert g["success_per_run"] == [2 / 3, 2 / 3, 1 / 3]
    assert g["invalid_tool_call_rate"] == pytest.approx(0.5)
    assert s["average"]["pass_hat_k"]["1"] == pytest.approx(5 / 9)  # one domain: its own numbers


# ------------------------------------------------------------------------------------------ ALFWorld
@pytest.fixture(scope="module")
def games() -> Path:
    require_alfworld()
    return generated_games(seed=0, num=6)


@pytest.fixture(scope="module")
def expert_eval(games, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ev") / "expert.json"
    cli("eval", "--env", "alfworld", "--data", str(games), "--split", "valid_seen", "--policy", "expert",
        "--runs", "2", "--workers", "2", "--json", str(out))
    return out


def test_expert_wins_every_generated_game_with_a_per_type_table(expert_eval):
    r = load(expert_eval)
    o = r["scores"]["overall"]
    assert o["success_per_run"] == [1.0, 1.0] and o["success_std"] == 0.0
    assert o["episodes"] == 12 and o["invalid_action_rate"] == 0.0
    assert set(r["scores"]["groups"]) == set(TYPES)
    assert all(g["success_mean"] == 1.0 for g in r["scores"]["groups"].values())
    ep = r["episodes"][0]
    assert {"task_id", "task_type", "success", "steps", "invalid_actions", "trajectory"} <= set(ep)
    key = ep["trajectory"].split("#", 1)[1]
    trajs = [json.loads(x) for x in expert_eval.with_name("expert.trajectories.jsonl").read_text().splitlines()]
    assert any(t["key"] == key and len(t["turns"]) == ep["steps"] for t in trajs)
    md = expert_eval.with_name("expert.md").read_text()
    assert "| pick_two_obj_and_place | 1 | 100.0 ± 0.0 |" in md


def test_random_policy_scores_low_with_its_invalid_action_rate(games, tmp_path):
    out = tmp_path / "random.json"
    p = cli("eval", "--env", "alfworld", "--data", str(games), "--policy", "random", "--runs", "2",
            "--max-steps", "10", "--workers", "2", "--json", str(out))
    o = load(out)["scores"]["overall"]
    assert o["success_mean"] <= 0.5
    assert o["steps"] > 0 and 0.0 <= o["invalid_action_rate"] <= 1.0
    assert "invalid actions" in p.stdout
    # seeded per (run, task, step): the two runs play different episodes
    eps = load(out)["episodes"]
    assert {e["steps"] for e in eps} and eps[0]["seed"] != eps[-1]["seed"]


def test_resume_after_sigkill_gives_the_same_json(games, tmp_path):
    args = ["eval", "--env", "alfworld", "--data", str(games), "--policy", "random", "--runs", "3",
            "--max-steps", "12", "--num-envs", "2", "--workers", "1"]
    full = tmp_path / "full" / "ev.json"
    cli(*args, "--json", str(full))
    killed = tmp_path / "killed" / "ev.json"
    killed.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "rwml_jax.cli", *args, "--json", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = killed.with_name("ev.episodes.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and len(records.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its env workers
    proc.wait()
    done_before = len(records.read_text().splitlines())
    assert 4 <= done_before < 18
    cli(*args, "--json", str(killed))
    assert len(records.read_text().splitlines()) == 18  # only the unfinished episodes were played again
    a, b = load(full), load(killed)
    assert a == b


def test_a_truncated_game_file_is_named_in_replay_and_eval(games, tmp_path):
    data = tmp_path / "games"
    shutil.copytree(games, data)
    victim = sorted(data.glob("*/*/game.tw-pddl"))[2]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])
    task_id = f"{victim.parent.parent.name}/{victim.parent.name}"

    rp = cli("envs", "replay", "--env", "alfworld", "--data", str(data), "--quiet", check=False)
    assert rp.returncode == 1
    assert "5/6 won" in rp.stdout and task_id in rp.stdout and "not valid JSON" in rp.stdout

    out = tmp_path / "expert.json"
    ev = cli("eval", "--env", "alfworld", "--data", str(data), "--policy", "expert", "--runs", "1", "--json", str(out))
    r = load(out)
    o = r["scores"]["overall"]
    assert o["episodes"] == 6 and o["load_errors"] == 1 and o["success_mean"] == pytest.approx(5 / 6)
    assert len(r["load_errors"]) == 1 and r["load_errors"][0].startswith(task_id)
    assert task_id in ev.stdout

    # valid JSON whose PDDL the engine cannot parse: found only when the worker loads it, still counted by name
    other = sorted(data.glob("*/*/game.tw-pddl"))[4]
    game = json.loads(other.read_text())
    game["pddl_problem"] = "(define (problem broken"
    other.write_text(json.dumps(game))
    other_id = f"{other.parent.parent.name}/{other.parent.name}"
    out = tmp_path / "expert2.json"
    cli("eval", "--env", "alfworld", "--data", str(data), "--policy", "expert", "--runs", "1", "--json", str(out))
    r = load(out)
    assert r["scores"]["overall"]["load_errors"] == 2 and r["scores"]["overall"]["success_mean"] == pytest.approx(4 / 6)
    assert any(e.startswith(f"cannot load task {other_id}: ParseError") for e in r["load_errors"])


def test_official_layout_ood_split(games, tmp_path):
    root = tmp_path / "alfworld"
    shutil.copytree(games, root / "json_2.1.1" / "valid_unseen")
    out = tmp_path / "ood.json"
    cli("eval", "--env", "alfworld", "--data", str(root), "--split", "ood", "--policy", "expert", "--runs", "1",
        "--limit", "2", "--json", str(out))
    r = load(out)
    assert r["settings"]["split"] == "valid_unseen" and r["scores"]["overall"]["success_per_run"] == [1.0]
    assert len(r["episodes"]) == 2


@pytest.mark.parametrize("source", DATA_SOURCES)
def test_valid_seen_expert_subset(source, tmp_path):
    require_alfworld()
    data = valid_seen(source).root
    out = tmp_path / "vs.json"
    cli("eval", "--env", "alfworld", "--data", str(data), "--split", "id", "--policy", "expert", "--runs", "1",
        "--limit", "6", "--workers", "2", "--json", str(out))
    o = load(out)["scores"]["overall"]
    assert o["episodes"] == 6 and o["success_mean"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("source", DATA_SOURCES)
def test_valid_seen_expert_every_game(source, tmp_path):
    require_alfworld()
    data = valid_seen(source)
    out = tmp_path / "vs.json"
    cli("eval", "--env", "alfworld", "--data", str(data.root), "--split", "valid_seen", "--policy", "expert",
        "--runs", "1", "--workers", "2", "--json", str(out), timeout=3600)
    r = load(out)
    assert r["scores"]["overall"]["episodes"] == data.num_games and r["scores"]["overall"]["success_mean"] == 1.0
    assert set(r["scores"]["groups"]) == set(TYPES)


def test_a_small_checkpoint_is_evaluated_end_to_end(games, tmp_path):
    from rwml_jax.models import save_pretrained
    from rwml_jax.sampling.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(str(tmp_path / "tok"))
    config, params = tiny_model(tok, seed=1)
    save_pretrained(config, params, tmp_path / "ckpt" / "model", tokenizer=tok)
    config2, params2 = tiny_model(tok, seed=2)
    save_pretrained(config2, params2, tmp_path / "start", tokenizer=tok)
    out = tmp_path / "model.json"
    cli("eval", "--env", "alfworld", "--data", str(games), "--policy", str(tmp_path / "ckpt"), "--runs", "1",
        "--limit", "2", "--max-steps", "2", "--max-new-tokens", "6", "--max-prompt-tokens", "256",
        "--start", str(tmp_path / "start"), "--json", str(out))
    r = load(out)
    assert r["settings"]["policy"] == str(tmp_path / "ckpt" / "model")
    assert [e["status"] for e in r["episodes"]] == ["ok", "ok"]
    assert all(e["steps"] == 2 for e in r["episodes"])  # a random model never wins in 2 steps
    assert r["scores"]["overall"]["success_mean"] == 0.0
    assert r["world_model"]["moved_fraction"] > 0.5  # two independent random inits differ almost everywhere


def test_compare_prints_a_table_one_layout(expert_eval, tmp_path):
    seen = load(expert_eval)
    unseen = json.loads(json.dumps(seen))
    unseen["settings"]["split"] = "valid_unseen"
    unseen["scores"]["overall"]["success_per_run"] = [0.5, 0.0]
    (tmp_path / "unseen.json").write_text(json.dumps(unseen))
    p = cli("compare", f"expert={expert_eval}", f"expert={tmp_path / 'unseen.json'}", "--json", str(tmp_path / "t.json"))
    assert "| method | ALFWorld ID | ALFWorld OOD | ALFWorld avg |" in p.stdout
    assert "| expert | 100.0 ± 0.0 | 25.0 ± 35.4 | 62.5 ± 17.7 |" in p.stdout
    run = tmp_path / "my_run"  # a run folder: its eval/*.json, the row named after the folder
    (run / "eval").mkdir(parents=True)
    shutil.copy(expert_eval, run / "eval" / "valid_seen.json")
    (run / "eval" / "DONE.json").write_text("{}")
    p = cli("compare", str(run), "--json", str(tmp_path / "t2.json"))
    assert "| my_run | 100.0 ± 0.0 |" in p.stdout
    assert load(tmp_path / "t2.json")[0]["ALFWorld ID"]["per_run"] == [1.0, 1.0]
    run = tmp_path / "two_models"  # the eval stage's layout: eval/<model>/<split>.json, a row per model
    for model, per_run in (("warmstart", [0.0, 0.5]), ("rwml", [1.0, 0.5])):
        ev = load(expert_eval)
        ev["settings"]["model_stage"] = model
        ev["scores"]["overall"]["success_per_run"] = per_run
        (run / "eval" / model).mkdir(parents=True)
        (run / "eval" / model / "valid_seen.json").write_text(json.dumps(ev))
    p = cli("compare", str(run))
    assert "| two_models: rwml | 75.0 ± 35.4 |" in p.stdout and "| two_models: warmstart | 25.0 ± 35.4 |" in p.stdout
    bad = cli("compare", str(tmp_path / "nothing"), check=False)
    assert bad.returncode == 2 and "neither a run folder nor an evaluation JSON" in bad.stderr


# ------------------------------------------------------------------------------------------ τ²
def test_tau2_gold_scores_pass1_of_one_and_random_scores_zero(tmp_path):
    out = tmp_path / "gold.json"
    p = cli("eval", "--env", "tau2", "--domain", "all", "--limit", "1", "--policy", "gold", "--runs", "2",
            "--workers", "2", "--json", str(out))
    s = load(out)["scores"]
    for d in ("airline", "retail", "telecom"):
        g = s["groups"][d]
        assert g["tasks"] == 1 and g["pass_hat_k"] == {"1": 1.0, "2": 1.0}
        assert sum(g["invalid_tool_calls"].values()) == 0
    assert s["overall"]["tool_calls"] > 0 and s["overall"]["invalid_tool_call_rate"] == 0.0
    assert s["average"]["pass_hat_k"]["1"] == 1.0
    assert "pass^2" in p.stdout

    out = tmp_path / "random.json"
    cli("eval", "--env", "tau2", "--domain", "retail", "--limit", "1", "--policy", "random", "--runs", "1",
        "--max-steps", "4", "--json", str(out))
    g = load(out)["scores"]["groups"]["retail"]
    assert g["success_mean"] == 0.0 and g["tool_calls"] == 4
    assert 0.0 <= g["invalid_tool_call_rate"] <= 1.0


@pytest.mark.slow
def test_tau2_gold_on_every_test_task(tmp_path):
    out = tmp_path / "gold.json"
    cli("eval", "--env", "tau2", "--domain", "all", "--policy", "gold", "--runs", "1", "--workers", "2",
        "--json", str(out), timeout=3600)
    s = load(out)["scores"]
    assert [s["groups"][d]["tasks"] for d in ("airline", "retail", "telecom")] == [20, 40, 40]
    assert s["average"]["pass_hat_k"]["1"] == 1.0


# ------------------------------------------------------------------------------------------ config
def test_eval_config_section_is_validated_and_registered():
    from rwml_jax.config import ConfigError, load_config
    from rwml_jax.train.stage_io import stage_config_keys
    from rwml_jax.train.stages import eval as eval_stage

    assert stage_config_keys("eval") == (eval_stage.CONFIG_KEYS, eval_stage.IGNORED_KEYS)
    for recipe in ("rwml_alfworld", "rwml_tau2"):
        c = load_config(recipe)
        assert (c.eval.max_steps, c.eval.runs) == (30, 3)
    assert tuple(load_config("rwml_alfworld").eval.splits) == ("valid_seen", "valid_unseen")
    assert eval_stage.model_stages(load_config("demo_cpu:smoke")) == ("rwml", "policy_rl@rwml")
    assert eval_stage.model_stages(load_config("demo_cpu")) == ("warmstart", "rwml", "policy_rl@base", "policy_rl@rwml")
    with pytest.raises(ConfigError) as e:
        load_config("demo_cpu", ["--config.eval.runs=0", "--config.eval.models=collect", "--config.eval.user=local"])
    msg = str(e.value)
    assert "eval.runs" in msg and "eval.models" in msg and "eval.user" in msg


def test_a_worker_crash_is_reported_not_scored_and_replayed_on_rerun(games, tmp_path):
    from rwml_jax.evaluation.harness import evaluate
    from rwml_jax.evaluation.policies import reference_policy
    from rwml_jax.evaluation.tasks import alfworld_tasks

    tasks = alfworld_tasks(games, "valid_seen")
    victim = tasks[1].task_id
    kwargs = {"crash_task": victim, "marker": str(tmp_path / "crashed"), "data_dir": str(games), "max_steps": 30}
    run = dict(env="alfworld", runs=1, seed=0, factory="pool_envs:CrashOnceAlfworldEnv", factory_kwargs=kwargs,
               max_steps=30, settings={"policy": "expert"}, num_envs=2, num_workers=1)
    r = evaluate(tasks, reference_policy("expert"), out=tmp_path / "ev.json", **run)
    o = r["scores"]["overall"]
    # every episode the dead worker hosted is marked (one worker: the victim and its neighbour slot)
    assert f"r0/{tasks[1].group}/{victim}" in r["crashed"]
    crashed = [e for e in r["episodes"] if e["status"] == "crashed"]
    assert len(crashed) == len(r["crashed"]) == o["crashed"] and all("restarted" in e["error"] for e in crashed)
    # a crash is not a policy failure: the rate is over the episodes that ran
    assert o["success_mean"] == 1.0 and o["successes"] == 6 - o["crashed"]
    assert "lost to env worker crashes" in (tmp_path / "ev.md").read_text()
    r = evaluate(tasks, reference_policy("expert"), out=tmp_path / "ev.json", **run)  # replays the crashed ones
    assert r["crashed"] == [] and r["scores"]["overall"]["success_mean"] == 1.0
    assert r["scores"]["overall"]["episodes"] == 6
