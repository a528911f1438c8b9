"""Runs stages of a recipe in one JAX process with N CPU devices, alone or as one of several processes
(jax.distributed on loopback), and records what a test needs to compare runs (used by tests/test_pod.py):

- OUT.p<i>.npz: the parameters this process holds (gathered to its host) each time a stage saves a model,
  under "<stage folder>/<model folder>/<parameter path>";
- OUT.p<i>.json: the stage summaries, and every path under the work dir this process opened for writing,
  renamed, or removed (a Python audit hook; files written by TensorStore's C++ code, i.e. orbax's array
  shards, are not seen).

    python tests/pipeline_worker.py --devices 8 --out res --work W --recipe demo_cpu:smoke [--stages a b] \
        [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0] -- --config.KEY=VALUE ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--recipe", default="demo_cpu:smoke")
    ap.add_argument("--stages", nargs="*", default=None)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("overrides", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("RWML_NO_PROGRESS", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    work = os.path.abspath(args.work)
    writes: list[list[str]] = []

    def audit(event: str, a: tuple) -> None:
        if event == "open" and isinstance(a[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.fsdecode(a[0]), a[1] or "", a[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                if os.path.abspath(path).startswith(work + os.sep):
                    writes.append([event, path])
        elif event in ("os.rename", "os.remove", "os.rmdir", "shutil.move", "shutil.rmtree") and a:
            path = os.fsdecode(a[0]) if isinstance(a[0], (str, bytes, os.PathLike)) else ""
            if os.path.abspath(path).startswith(work + os.sep):
                writes.append([event, path])

    sys.addaudithook(audit)

    import jax
    import numpy as np

    from rwml_jax import sharding as sh

    if args.coordinator:
        assert sh.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        assert jax.process_count() == args.num_processes

    import importlib

    from rwml_jax.config import load_config
    from rwml_jax.train.run import run_stages

    saved: dict[str, np.ndarray] = {}
    for name in ("warmstart", "filter", "rwml", "wm_sft"):
        mod = importlib.import_module(f"rwml_jax.train.stages.{name}")
        original = mod.save_pretrained

        def recording(config, params, path, *a, _orig=original, **kw):
            prefix = "/".join(os.fspath(path).rstrip("/").split("/")[-2:])
            for p, leaf in jax.tree_util.tree_flatten_with_path(sh.to_host(params))[0]:
                saved[f"{prefix}/{jax.tree_util.keystr(p)}"] = np.asarray(leaf)
            return _orig(config, params, path, *a, **kw)

        mod.save_pretrained = recording

    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    config = load_config(args.recipe, [f"--config.work_dir={work}", *overrides])
    summaries = run_stages(config, tuple(args.stages) if args.stages else None)
    out = f"{args.out}.p{jax.process_index()}"
    np.savez(out + ".npz", **saved)
    with open(out + ".json", "w") as f:
        json.dump({"summaries": summaries, "writes": writes, "processes": jax.process_count(),
                   "devices": jax.device_count()}, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
