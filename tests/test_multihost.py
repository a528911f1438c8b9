"""Two JAX processes x 4 CPU devices (jax.distributed on loopback, gloo collectives) run the sharded,
micro-batched GRPO update and end with the same parameters as one process with 8 devices."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from test_update import load_results, run_worker

SCENARIO = "adamw_micro_8dev"  # 3 AdamW steps, KL (k1) to a reference, 4 micro-batches, 2x2x2 mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_single_process(tmp_path):
    env = dict(os.environ)
    for var in ("RWML_COORDINATOR", "RWML_NUM_PROCESSES", "RWML_PROCESS_ID", "RWML_DISTRIBUTED"):
        env.pop(var, None)
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        run_worker(tmp_path / "multi.npz", [SCENARIO], devices=4, env=env,
                   extra=["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)])
        for i in range(2)
    ]
    single = run_worker(tmp_path / "single.npz", [SCENARIO], devices=8, env=env)
    for p in [*procs, single]:
        log, _ = p.communicate(timeout=1500)
        assert p.returncode == 0, log[-5000:]

    want_leaves, want = load_results(tmp_path / "single.npz")
    ref = want_leaves(SCENARIO)
    for i in range(2):
        got_leaves, got = load_results(tmp_path / f"multi.p{i}.npz")
        assert int(got[f"{SCENARIO}:processes"]) == 2 and int(want[f"{SCENARIO}:processes"]) == 1
        assert int(got[f"{SCENARIO}:step"]) == 3
        np.testing.assert_allclose(got[f"{SCENARIO}:losses"], want[f"{SCENARIO}:losses"], rtol=1e-6)
        params = got_leaves(SCENARIO)
        assert params.keys() == ref.keys() and len(ref) > 5
        for k in ref:
            err = np.abs(params[k] - ref[k]).max() / np.abs(ref[k]).max()
            assert err <= 1e-6, f"process {i} {k}: {err:.2e}"
