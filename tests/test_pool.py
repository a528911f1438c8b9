"""The env worker pool with real ALFWorld engines in its workers: batching, crash / hang recovery, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alfworld_testdata import REPO, generated_games, require_alfworld
from rwml_jax.envs.alfworld_data import list_games
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.pool import EnvPool, EnvWorkerError
from rwml_jax.envs.recorder import TransitionRecorder

require_alfworld()

FACTORY = "rwml_jax.envs.alfworld_env:AlfworldEnv"


@pytest.fixture(scope="module")
def games():
    data = generated_games()
    gs = list_games(data, "train")
    walks = {g.task_id: json.loads(Path(g.gamefile).read_text())["walkthrough"] for g in gs}
    return data, gs, walks


def task(g) -> TaskSpec:
    return TaskSpec("alfworld", "train", g.task_id)


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (reaped, or a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def wait_gone(pids, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_batch_reset_step_and_transitions(games):
    data, gs, walks = games
    with EnvPool(FACTORY, num_envs=3, num_workers=2, factory_kwargs={"data_dir": str(data)}) as pool:
        assert len(set(pool.worker_pids())) == 2
        chosen = gs[:3]
        rec = TransitionRecorder()
        first = pool.reset([task(g) for g in chosen])
        rec.on_reset([task(g) for g in chosen], first)
        ids = [r.info["episode_id"] for r in first]
        assert len(set(ids)) == 3 and [r.info["slot"] for r in first] == [0, 1, 2]
        assert all(r.info["task_id"] == g.task_id for r, g in zip(first, chosen))
        pos = [0, 0, 0]
        won = [False] * 3
        prev_obs = [r.observation for r in first]
        while not all(won):
            actions = [None if won[i] else walks[g.task_id][pos[i]] for i, g in enumerate(chosen)]
            results = pool.step(actions)
            new = rec.on_step(actions, results)
            assert len(new) == sum(a is not None for a in actions)
            for i, (a, r) in enumerate(zip(actions, results)):
                if a is None:
                    assert r is None  # idle slot
                    continue
                t = next(t for t in new if t.episode_id == ids[i])
                assert (t.observation, t.action, t.next_observation) == (prev_obs[i], a, r.observation)
                assert t.step == pos[i] and t.valid and t.next_kind == "observation"
                assert r.info["episode_id"] == ids[i]
                prev_obs[i] = r.observation
                pos[i] += 1
                if r.done:
                    assert r.reward == 1.0 and pos[i] == len(walks[chosen[i].task_id])
                    won[i] = True
        assert len(rec.transitions) == sum(len(walks[g.task_id]) for g in chosen)
        stats = pool.cpu_stats()  # worker CPU accounting used by the scaling benchmark
        assert stats["rounds"] >= max(len(walks[g.task_id]) for g in chosen) + 1
        assert 0 < stats["critical_cpu_seconds"] <= stats["cpu_seconds"]
        assert rec.open_slots() == []
        with pytest.raises(ValueError, match="finished its episode"):
            pool.step(["look", None, None])
        # an adapter exception ends only that episode: close slot 1's engine behind the pool's back
        pool.reset([task(chosen[0]), task(chosen[1])])
        pool.call(1, "close")
        res = pool.step(["look", "look"])
        assert not res[0].truncated and res[0].valid
        assert res[1].truncated and "RuntimeError" in res[1].info["error"]
        # bad input at reset is raised to the caller, and the pool keeps working
        with pytest.raises(ValueError, match="unknown ALFWorld task id"):
            pool.reset([TaskSpec("alfworld", "train", "no-such-task/trial_0")])
        assert pool.reset([task(chosen[2])])[0].info["task_id"] == chosen[2].task_id
        # one round that restarts slot 0 while slot 1 steps (rollouts refill finished slots this way)
        pool.reset([None, task(chosen[1])])
        mixed = pool.advance([task(chosen[0]), walks[chosen[1].task_id][0], None])
        assert mixed[0].info["step"] == 0 and mixed[0].observation.startswith("-= Welcome")
        assert mixed[0].info["episode_id"] not in ids and mixed[2] is None
        assert mixed[1].info["step"] == 1 and mixed[1].valid
        with pytest.raises(TypeError, match="items\\[1\\]"):
            pool.advance([None, 3])
        assert pool.restarts == 0
        pids = pool.worker_pids()
    assert wait_gone(pids, 5), "workers still alive after the pool closed"


def test_killed_worker_is_restarted_and_its_episodes_truncated(games):
    data, gs, walks = games
    chosen = gs[:4]
    with EnvPool(FACTORY, num_envs=4, num_workers=2, factory_kwargs={"data_dir": str(data)}) as pool:
        # two resets per round: each worker takes one (list scheduling), so slots 0 and 2 land in worker 0
        pool.reset([task(chosen[0]), task(chosen[1]), None, None])
        pool.reset([None, None, task(chosen[2]), task(chosen[3])])
        first_step = pool.step([walks[g.task_id][0] for g in chosen])
        assert all(r.valid and not r.truncated for r in first_step)
        victim = pool.worker_pids()[0]  # hosts slots 0 and 2
        assert pool.worker_of(0) == pool.worker_of(2) == 0
        os.kill(victim, signal.SIGKILL)
        # slot 2 idles this round: its lost episode must be reported on its next step
        res = pool.step([walks[chosen[0].task_id][1], walks[chosen[1].task_id][1], None,
                         walks[chosen[3].task_id][1]])
        assert res[0].truncated and not res[0].done and "SIGKILL" in res[0].info["error"]
        assert "restarted" in res[0].info["error"] and res[0].info["episode_id"]
        assert res[2] is None
        for i in (1, 3):  # the other worker's episodes carry on
            assert not res[i].truncated and res[i].valid
        assert pool.restarts == 1 and pool.worker_pids()[0] != victim and process_gone(victim)
        lost = pool.step([None, None, walks[chosen[2].task_id][1], None])
        assert lost[2].truncated and "SIGKILL" in lost[2].info["error"]
        # slots 1 and 3 play on to a win; the restarted worker plays a fresh episode to a win
        pool.reset([task(chosen[0])])
        pos = {0: 0, 1: 2, 3: 2}
        finished = set()
        while len(finished) < 3:
            actions = [None] * 4
            for i, p in pos.items():
                if i not in finished:
                    actions[i] = walks[chosen[i].task_id][p]
            for i, r in enumerate(pool.step(actions)):
                if r is None:
                    continue
                assert not r.truncated, r.info
                pos[i] += 1
                if r.done:
                    assert r.reward == 1.0
                    finished.add(i)


def test_hung_worker_times_out_and_is_restarted(games):
    data, gs, walks = games
    chosen = gs[:2]
    with EnvPool(FACTORY, num_envs=2, num_workers=2, factory_kwargs={"data_dir": str(data)},
                 step_timeout=8.0) as pool:
        pool.reset([task(g) for g in chosen])
        stuck = pool.worker_pids()[1]
        os.kill(stuck, signal.SIGSTOP)  # the worker stops answering, like an engine stuck in a loop
        t0 = time.monotonic()
        res = pool.step([walks[g.task_id][0] for g in chosen])
        assert time.monotonic() - t0 < 60
        assert not res[0].truncated and res[0].valid
        assert res[1].truncated and "did not answer within 8.0 s" in res[1].info["error"]
        assert pool.restarts == 1 and wait_gone([stuck], 5)
        # the fresh worker hosts a working env again
        again = pool.reset([None, task(chosen[1])])
        assert again[0] is None and again[1].info["task_id"] == chosen[1].task_id
        r = pool.step([None, walks[chosen[1].task_id][0]])
        assert r[1].valid and not r[1].truncated


def test_bad_factory_fails_fast_with_a_clear_error():
    with pytest.raises(ValueError, match="cannot import env factory"):
        EnvPool("rwml_jax.envs.no_such_module:Env", num_envs=1)
    with pytest.raises(EnvWorkerError, match="could not build its environments.*max_steps"):
        EnvPool(FACTORY, num_envs=1, factory_kwargs={"max_steps": 0}, start_timeout=120)


_SCRIPT = textwrap.dedent("""
    import sys, time
    from rwml_jax.envs.pool import EnvPool
    if __name__ == "__main__":
        with EnvPool("rwml_jax.envs.alfworld_env:AlfworldEnv", num_envs=2, num_workers=2) as pool:
            print(" ".join(map(str, pool.worker_pids())), flush=True)
            time.sleep(600)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "parent-killed"])
def test_no_orphan_workers(tmp_path, sig):
    """Ctrl-C in the parent shuts the workers down; a SIGKILLed parent takes them with it."""
    script = tmp_path / "pool_script.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONFAULTHANDLER="1")  # a hung parent dumps its stacks on the SIGABRT below
    # A runner started in the background (`cmd &`) ignores SIGINT and children inherit that: restore the
    # default so the script sees Ctrl-C as a terminal would deliver it.
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert not any(process_gone(p) for p in pids)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _out, err = proc.communicate(timeout=10)
            raise AssertionError(f"parent still running 30 s after {sig.name}; its stderr:\n{err[-6000:]}")
        assert wait_gone(pids, 15), f"orphan workers left after {sig.name}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_resets_go_to_the_least_loaded_worker_and_use_preloaded_games(games):
    """Load balancing: a reset moves its slot to the idle worker, which also preloads the hinted next game;
    the reset of that game then runs there on the preloaded env and plays exactly like a cold one."""
    from rwml_jax.envs.alfworld_env import AlfworldEnv

    data, gs, walks = games
    a, b, x, y = gs[:4]
    with EnvPool(FACTORY, num_envs=3, num_workers=2, factory_kwargs={"data_dir": str(data)}) as pool:
        pool.reset([task(a), task(b), None])
        assert [pool.worker_of(i) for i in range(3)] == [0, 1, 0]  # the static layout to start with
        # worker 0 steps slot 0 while slot 2 (home: worker 0) starts a game: it goes to idle worker 1,
        # and worker 0, left with one step, preloads the next game
        res = pool.advance([walks[a.task_id][0], None, task(x)], upcoming=[task(y)])
        assert res[0].valid and res[2].info["task_id"] == x.task_id
        assert pool.worker_of(2) == 1 and pool.preloads == 1
        assert pool.step([walks[a.task_id][1], None, walks[x.task_id][0]])[2].valid  # the moved env steps
        warm = pool.reset([None, task(y), None])[1]
        assert pool.preload_hits == 1 and pool.worker_of(1) == 0
        warm_trace = [(warm.observation, warm.info["admissible_commands"])]
        for act in walks[y.task_id]:
            r = pool.step([None, act, None])[1]
            warm_trace.append((r.observation, r.valid, r.done, r.info["admissible_commands"]))
        assert warm_trace[-1][2] is True  # won
        assert set(pool.cost_estimates()) >= {"reset", "warm_reset", "step", "preload"}
    env = AlfworldEnv(str(data))  # the same game, reset cold in this process
    cold = env.reset(task(y))
    cold_trace = [(cold.observation, cold.info["admissible_commands"])]
    for act in walks[y.task_id]:
        r = env.step(act)
        cold_trace.append((r.observation, r.valid, r.done, r.info["admissible_commands"]))
    env.close()
    assert warm_trace == cold_trace


def test_a_round_of_many_resets_is_shared_by_the_workers_and_every_game_still_wins(games):
    """Resets are handed out one at a time to whichever worker is free: slots move between workers (their
    old env is dropped later), preloads are used, and every walkthrough still wins in the worker its slot
    ended up in."""
    from rwml_jax.envs.replay import replay_games

    data, gs, walks = games
    with EnvPool(FACTORY, num_envs=4, num_workers=2, factory_kwargs={"data_dir": str(data)}) as pool:
        first = pool.reset([task(g) for g in gs[:4]])
        assert [r.info["task_id"] for r in first] == [g.task_id for g in gs[:4]]
        assert {pool.worker_of(i) for i in range(4)} == {0, 1}  # each worker started with one of the resets
        report = replay_games(pool, gs + gs, "train")  # 12 episodes through 4 slots, with `upcoming` hints
        assert report.wins == 12 and report.resets == 12, [g for g in report.games if not g.won]
        assert pool.restarts == 0 and pool.preload_hits <= pool.preloads


SCRIPTED = "pool_envs:ScriptedEnv"


def scripted(task_id: str) -> TaskSpec:
    return TaskSpec("scripted", "train", task_id)


def test_resets_are_handed_to_whichever_worker_answers_first():
    """Static layout would give worker 0 both long resets (slots 0 and 2); list scheduling gives the second
    to worker 1, free after its short one, and the last reset to worker 0 when it answers."""
    with EnvPool(SCRIPTED, num_envs=4, num_workers=2) as pool:
        pids = pool.worker_pids()
        res = pool.reset([scripted(t) for t in ("sleep:1.0", "sleep:0.05", "sleep:1.0", "sleep:0.05")])
        ran_in = [int(r.observation.rsplit(" ", 1)[1]) for r in res]
        assert ran_in == [pids[0], pids[1], pids[1], pids[0]]
        assert [pool.worker_of(i) for i in range(4)] == [0, 1, 1, 0]
        # steps follow the slots to their new workers (and the old envs were dropped without harm)
        stepped = pool.step(["a", "b", "c", "d"])
        assert [int(r.observation.rsplit(" ", 1)[1]) for r in stepped] == ran_in
        assert pool.restarts == 0


def test_a_worker_dying_mid_round_truncates_what_it_already_answered_in_that_round():
    with EnvPool(SCRIPTED, num_envs=4, num_workers=2) as pool:
        # worker 0: slot 0, then slot 2 from the queue, then slot 3, which kills it; worker 1: slot 1
        res = pool.reset([scripted(t) for t in ("sleep:0.05", "sleep:1.0", "sleep:0.05", "die")])
        assert not res[1].truncated and res[1].observation.startswith("sleep:1.0")
        for i in (0, 2, 3):
            assert res[i].truncated and "exit code 3" in res[i].info["error"], res[i]
        assert pool.restarts == 1
        again = pool.reset([scripted("sleep:0"), None, scripted("sleep:0"), scripted("sleep:0")])
        assert all(not again[i].truncated for i in (0, 2, 3))
        assert not pool.step(["x", "y", "z", "w"])[1].truncated  # worker 1's episode was never touched


def test_episode_ids_follow_slot_order_whatever_order_the_workers_answer_in():
    with EnvPool(SCRIPTED, num_envs=4, num_workers=2, run_tag="run7") as pool:
        # slot 1 answers first, slot 0 last: ids still count in slot order
        res = pool.reset([scripted(t) for t in ("sleep:0.6", "sleep:0.01", "sleep:0.3", "sleep:0.01")])
        assert [r.info["episode_id"] for r in res] == [f"run7-{i:07d}" for i in range(4)]
    with pytest.raises(ValueError, match="run_tag"):
        EnvPool(SCRIPTED, num_envs=1, run_tag="has space")
