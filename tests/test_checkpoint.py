"""Checkpoints: round trip of params / optax state / typed RNG keys / cursor, resharded restore, keep-N,
and atomicity under SIGKILL during a save (real orbax, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rwml_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    DataCursor,
    abstract_like,
)

REPO = Path(__file__).resolve().parent.parent


def _bytes(x) -> bytes:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).tobytes()


def _assert_bit_exact(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert _bytes(x) == _bytes(y)


@jax.jit
def _train_state_jit(seed):
    k = jax.random.key(seed)
    params = {"embed": jax.random.normal(k, (16, 8)), "norm": jnp.ones((8,), jnp.bfloat16),
              "layers": {"w": jax.random.normal(jax.random.fold_in(k, 1), (2, 8, 8), jnp.bfloat16)}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments and count
    rng, sub = jax.random.split(jax.random.key(seed + 100))
    return {"params": params, "opt_state": opt_state, "rng": rng, "legacy_rng": jax.random.PRNGKey(seed),
            "step": jnp.asarray(3, jnp.int32)}, sub


def _train_state(seed: int = 0):
    """A small but complete train state (one compile: eager ops compile one by one on CPU)."""
    return _train_state_jit(jnp.asarray(seed, jnp.uint32))


def test_round_trip_params_optimizer_rng_cursor(tmp_path):
    state, _ = _train_state()
    cursor = DataCursor(epoch=1, position=64, seed=1234)
    with Checkpointer(tmp_path / "ckpt", keep=2) as ck:
        assert ck.latest_step() is None
        assert ck.save(3, state, {"tokens_seen": 4096}, cursor=cursor)
        assert not ck.save(3, state)  # an existing step is never overwritten
        ck.wait()
        assert ck.latest_step() == 3
    # a fresh process-like reopen of the folder
    with Checkpointer(tmp_path / "ckpt", keep=2) as ck:
        restored, extra = ck.restore(target_abstract=abstract_like(state))
    _assert_bit_exact(restored, state)
    assert isinstance(restored["opt_state"][1][0], optax.ScaleByAdamState)  # containers as in the target
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    # the restored key continues the same random stream
    np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (4,)), jax.random.uniform(state["rng"], (4,)))
    assert extra["tokens_seen"] == 4096
    assert DataCursor.from_dict(extra["cursor"]) == cursor


def test_restore_without_target_and_errors(tmp_path):
    state, _ = _train_state(1)
    with Checkpointer(tmp_path / "c") as ck:
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            ck.restore()
        ck.save(1, state)
        ck.wait()
        plain, _ = ck.restore()
        assert jax.dtypes.issubdtype(plain["rng"].dtype, jax.dtypes.prng_key)  # re-wrapped from key data
        np.testing.assert_array_equal(np.asarray(plain["params"]["embed"]), np.asarray(state["params"]["embed"]))
        with pytest.raises(CheckpointError, match="step 7"):
            ck.restore(7)
        wrong = abstract_like({"params": state["params"]})
        with pytest.raises(CheckpointError, match="does not match"):
            ck.restore(1, target_abstract=wrong)


def test_keep_n_and_donation_after_async_save(tmp_path):
    params = {"w": jnp.arange(1024.0)}
    update = jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p), donate_argnums=0)
    with Checkpointer(tmp_path / "c", keep=2) as ck:
        for step in range(1, 5):
            ck.save(step, params)
            params = update(params)  # donates the buffers the async save was handed
        ck.wait()
        assert ck.all_steps() == [3, 4]
        for step in (3, 4):
            r, _ = ck.restore(step, target_abstract=abstract_like(params))
            np.testing.assert_array_equal(np.asarray(r["w"]), np.arange(1024.0) + (step - 1))


def test_data_cursor_order_is_reproducible_across_resume():
    n, bs = 10, 3
    full = DataCursor(seed=5)
    uninterrupted = [full.next_batch(n, bs).tolist() for _ in range(7)]
    c = DataCursor(seed=5)
    first = [c.next_batch(n, bs).tolist() for _ in range(4)]
    resumed = DataCursor.from_dict(c.to_dict())  # what a checkpoint stores
    rest = [resumed.next_batch(n, bs).tolist() for _ in range(3)]
    assert first + rest == uninterrupted
    # drop_last: each epoch yields 3 full batches of distinct examples, epochs use different orders
    ep0 = [i for b in uninterrupted[:3] for i in b]
    ep1 = [i for b in uninterrupted[3:6] for i in b]
    assert len(set(ep0)) == 9 and len(set(ep1)) == 9 and ep0 != ep1


_SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rwml_jax.train.checkpoint import Checkpointer
    d = sys.argv[1]
    devs = np.array(jax.devices())
    mesh_a = Mesh(devs.reshape(4, 1), ("fsdp", "tensor"))
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh_a, P("fsdp", None)))
    key = jax.device_put(jax.random.split(jax.random.key(0), 4), NamedSharding(mesh_a, P("fsdp")))
    with Checkpointer(d) as ck:
        ck.save(1, {"w": w, "keys": key})
    mesh_b = Mesh(devs.reshape(2, 2), ("fsdp", "tensor"))
    target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh_b, P(None, "tensor"))),
              "keys": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh_b, P("fsdp")))}
    with Checkpointer(d) as ck:
        r, _ = ck.restore(target_abstract=target)
    assert r["w"].sharding == target["w"].sharding, r["w"].sharding
    assert r["w"].addressable_shards[0].data.shape == (8, 4)
    np.testing.assert_array_equal(np.asarray(r["w"]), np.arange(64.0).reshape(8, 8))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(r["keys"])), np.asarray(jax.random.key_data(key)))
    print("RESHARDED_OK")
""")


def test_sharded_save_restores_into_a_different_mesh(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "c")], capture_output=True, text=True,
                         timeout=240, check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "RESHARDED_OK" in out.stdout, out.stderr[-3000:]


# ---- atomicity under SIGKILL ------------------------------------------------------------------------
# The worker saves step 1, then saves steps 2, 3, ... (32 MiB each) until it is killed. Every step's content
# is a pure function of the step, so the parent can check whatever got committed.
_WORKER = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp, numpy as np
    from rwml_jax.train.checkpoint import Checkpointer
    def state(step):
        rng = np.random.default_rng(step)
        return {"a": jnp.asarray(rng.standard_normal(4 << 20, dtype=np.float32)),
                "b": jnp.asarray(rng.integers(0, 2**31, 4 << 20, dtype=np.int32)), "step": jnp.int32(step)}
    ck = Checkpointer(sys.argv[1], keep=10)
    start = ck.latest_step() or 0
    ck.save(start + 1, state(start + 1), {"step": start + 1})
    ck.wait()
    print("COMMITTED", start + 1, flush=True)
    step = start + 2
    while True:
        s = state(step)
        print("SAVING", step, flush=True)
        ck.save(step, s, {"step": step})
        step += 1
""")


def _expected(step: int):
    rng = np.random.default_rng(step)
    return {"a": jnp.asarray(rng.standard_normal(4 << 20, dtype=np.float32)),
            "b": jnp.asarray(rng.integers(0, 2**31, 4 << 20, dtype=np.int32)), "step": jnp.int32(step)}


def _start_worker(ckdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(ckdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    assert line.startswith("COMMITTED"), line
    return proc


def _check_every_listed_step_restores(ckdir: Path) -> list[int]:
    with Checkpointer(ckdir, keep=10) as ck:
        steps = ck.all_steps()
        assert steps, "the first committed checkpoint was lost"
        target = abstract_like(_expected(0))
        for step in steps:
            restored, extra = ck.restore(step, target_abstract=target)
            assert extra["step"] == step
            _assert_bit_exact(restored, _expected(step))
    return steps


def test_sigkill_mid_write_leaves_previous_checkpoint_valid(tmp_path):
    ckdir = tmp_path / "ckpt"
    proc = _start_worker(ckdir)
    try:
        assert proc.stdout.readline().startswith("SAVING 2")
        deadline = time.monotonic() + 60
        tmp = None
        while tmp is None and time.monotonic() < deadline:  # wait until step 2's write is under way
            tmp = next((p for p in ckdir.iterdir() if p.name.startswith("2.") and "tmp" in p.name), None)
            time.sleep(0.001)
        assert tmp is not None, "never saw step 2 being written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert any("tmp" in p.name for p in ckdir.iterdir()), "the kill landed after the commit; test proves nothing"
    with Checkpointer(ckdir, keep=10) as ck:
        assert ck.latest_step() == 1  # the partial step 2 is not listed
    assert _check_every_listed_step_restores(ckdir) == [1]
    # the next run cleans the partial save up and carries on
    proc = _start_worker(ckdir)
    proc.kill()
    proc.wait()
    assert not any(p.name.startswith("2.") and "tmp" in p.name for p in ckdir.iterdir())
    assert _check_every_listed_step_restores(ckdir)[:2] == [1, 2]


@pytest.mark.parametrize("delay_s", [0.1, 0.6])
def test_sigkill_at_any_moment_never_leaves_a_broken_checkpoint(tmp_path, delay_s):
    ckdir = tmp_path / "ckpt"
    proc = _start_worker(ckdir)
    try:
        time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    steps = _check_every_listed_step_restores(ckdir)
    assert steps == list(range(1, len(steps) + 1))
