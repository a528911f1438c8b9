"""Offline ALFWorld game generator: files in alfworld's own domain / grammar, loaded and won in the real
engine through the adapter, reproducible from the seed."""

from __future__ import annotations

import argparse
import importlib.resources as ir
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alfworld_testdata import REPO, generated_games, require_alfworld
from rwml_jax.envs.alfworld_data import TASK_TYPES, list_games
from rwml_jax.envs.base import TaskSpec

require_alfworld()

from rwml_jax.envs.alfworld_env import NOTHING_HAPPENS, AlfworldEnv
from rwml_jax.envs.alfworld_gen import generate_games


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generated_games_use_alfworlds_domain_and_grammar():
    data = generated_games()
    games = list_games(data, "train")
    assert sorted(g.task_type for g in games) == sorted(TASK_TYPES)
    domain = (ir.files("alfworld") / "data" / "alfred.pddl").read_text()
    grammar = (ir.files("alfworld") / "data" / "alfred.twl2").read_text()
    index = json.loads((data / "generation.json").read_text())
    assert index["seed"] == 0 and len(index["games"]) == 6
    for g in games:
        d = json.loads(Path(g.gamefile).read_text())
        assert set(d) == {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
        assert d["solvable"] is True and d["pddl_domain"] == domain
        assert "UNKNOWN GOAL" not in d["grammar"]
        task = next(x["task"] for x in index["games"] if x["task_id"] == g.task_id)
        assert d["grammar"] == grammar.replace("UNKNOWN GOAL", task)
        folder = g.task_id.split("/")[0]
        ttype, obj, mrecep, _recep, scene = folder.split("-")
        assert ttype == g.task_type and mrecep == "None" and scene.isdigit()
        assert f"objectType ?o {obj}Type" in d["pddl_problem"] or f"objectType ?o1 {obj}Type" in d["pddl_problem"]
        # small scenes: a handful of receptacles, short walkthroughs
        n_recep = len(re.findall(r"^\s+\S+ - receptacle$", d["pddl_problem"], flags=re.MULTILINE))
        assert 4 <= n_recep <= 7 and 2 <= len(d["walkthrough"]) <= 12


def test_generated_games_replay_to_a_win_in_the_real_engine():
    data = generated_games()
    env = AlfworldEnv(data, max_steps=30)
    try:
        for g in list_games(data, "train"):
            walk = json.loads(Path(g.gamefile).read_text())["walkthrough"]
            first = env.reset(TaskSpec("alfworld", "train", g.task_id))
            assert not first.done and "Your task is to: " in first.observation
            assert first.info["task"] in json.loads(Path(g.gamefile).read_text())["grammar"]
            admissible = first.info["admissible_commands"]
            for i, a in enumerate(walk):
                assert a in admissible, (g.task_id, a, admissible)
                r = env.step(a)
                assert r.valid and r.observation != NOTHING_HAPPENS
                assert r.done == (i == len(walk) - 1), (g.task_id, i)
                admissible = r.info["admissible_commands"]
            assert r.reward == 1.0 and r.info["won"] and r.info["task_type"] == g.task_type
    finally:
        env.close()


def test_generation_is_reproducible_across_processes(tmp_path):
    """Same seed -> byte-identical files, even in a process with a different hash seed; another seed
    gives other games."""
    a = tmp_path / "a"
    generate_games(a, 3, seed=11)
    code = ("import sys; from rwml_jax.envs.alfworld_gen import generate_games; "
            "generate_games(sys.argv[1], 3, seed=11)")
    env = dict(os.environ, PYTHONHASHSEED="12345",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, env=env, timeout=600)
    assert files(a) == files(tmp_path / "b")
    generate_games(tmp_path / "c", 3, seed=12)
    assert files(a) != files(tmp_path / "c")


def test_cli_generate_and_bad_input(tmp_path, capsys):
    from rwml_jax.envs import cli

    parser = argparse.ArgumentParser(prog="rwml-jax")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["envs", "generate", "--out", str(tmp_path / "g"), "--num", "2", "--seed", "3",
                              "--task-types", "pick_heat_then_place_in_recep"])
    assert args.func(args) == 0
    games = list_games(tmp_path / "g", "train")
    assert len(games) == 2 and {g.task_type for g in games} == {"pick_heat_then_place_in_recep"}
    assert "wrote 2 solvable games" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown ALFWorld task type"):
        generate_games(tmp_path / "x", 1, task_types=["pick_and_juggle"])
    with pytest.raises(ValueError, match="num must be >= 1"):
        generate_games(tmp_path / "x", 0)
