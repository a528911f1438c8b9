#!/usr/bin/env python3
"""Run `rwml-jax` on a TPU pod slice (gcloud) or a multi-node GPU cluster (SLURM): one process per host.

    python launch/pod.py tpu run --name rwml-v5p --zone us-east5-a --accelerator v5p-64 --spot \\
        --model Qwen/Qwen2.5-7B-Instruct --model Qwen/Qwen3-Embedding-8B \\
        -- run rwml_alfworld --config.work_dir=gs://my-bucket/runs/alfworld --config.mesh.fsdp=32
    python launch/pod.py tpu attach --name rwml-v5p --zone us-east5-a --run-id RUN_ID   # stream again
    python launch/pod.py tpu stop   --name rwml-v5p --zone us-east5-a --run-id RUN_ID   # stop every worker
    python launch/pod.py tpu delete --name rwml-v5p --zone us-east5-a                   # give the slice back
    python launch/pod.py slurm run --nodes 4 --gpus-per-node 8 --partition gpu \\
        -- run rwml_alfworld --config.work_dir=/shared/runs/alfworld --config.mesh.fsdp=32

Every command takes `--dry-run`: it prints each command (and each script it would copy to the workers)
and runs nothing. Standard library only, so it runs on any laptop with `gcloud` (or a SLURM login node).

TPU (`tpu run`), in order:
 1. the slice: reused when it exists, else created as a queued resource (`--spot`, `--reserved`, or
    on-demand; `--no-queued` uses `tpu-vm create`), then waited for until ACTIVE;
 2. the code: `git archive` of `--git-rev` (default HEAD) of this checkout, or a wheel (`--wheel`), plus the
    setup / run / status / stop scripts, copied to ``~/rwml-jax-runs/<run id>/`` on every worker (paths
    relative to the remote home: nothing expands on the launching machine);
 3. setup on every worker: a virtualenv with ``.[tpu,envs,embed]``, the `--model` weights fetched once per
    host into the host's Hugging Face cache (later runs find them there), stale TPU locks cleaned
    (`/tmp/libtpu_lockfile`, processes holding `/dev/accel*` / `/dev/vfio/*`);
 4. the run, detached (`setsid nohup`, survives a dropped ssh session) with one log per worker,
    ``logs/worker-<i>.log``, the environment forwarded (ALFWORLD_DATA, HF_*, WANDB_*, `--env`);
 5. worker 0's log streamed here while every worker's status is polled; when one fails, all are stopped.
    Ctrl-C detaches (the run goes on); `tpu attach` resumes the streaming.

SLURM (`slurm run`): writes an sbatch script (one task per node, `srun --kill-on-bad-exit=1` so one failed
task stops the job, one log per task, the coordinator from the node list, model weights fetched once per
node into a shared cache, the code at a git revision or a wheel installed into a virtualenv) and submits it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_DIR = "rwml-jax-runs"  # on each worker, relative to the remote home
EXTRAS_TPU = "tpu,envs,embed"
EXTRAS_GPU = "gpu,envs,embed"
# forwarded to every worker when set here (plus every HF_* variable and each --env)
FORWARD_ENV = ("ALFWORLD_DATA", "WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT", "RWML_CACHE_DIR")
# default TPU software versions per generation (gcloud's --runtime-version / --version)
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
POLL_S = 30


# ------------------------------------------------------------------------------------------------
# Slice shapes
# ------------------------------------------------------------------------------------------------
def tpu_hosts(accelerator: str) -> int:
    """Worker VMs of a slice: v4-N / v5p-N count TensorCores (2 per chip, 4 chips per host); v5litepod-N /
    v6e-N count chips (one host up to 8 chips, 4 per host beyond)."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator)
    if not m:
        raise SystemExit(f"--accelerator {accelerator!r}: expected v4-N, v5p-N, v5litepod-N or v6e-N")
    family, n = m.group(1), int(m.group(2))
    if family in ("v4", "v5p"):
        return max(1, n // 2 // 4)
    return 1 if n <= 8 else n // 4


def forwarded_env(environ: Mapping[str, str], extra: Sequence[str]) -> dict[str, str]:
    """NAME=VALUE pairs for the workers: FORWARD_ENV and HF_* from `environ`, then each --env (NAME takes
    its value from `environ`, NAME=VALUE is literal)."""
    out = {k: environ[k] for k in sorted(environ) if k in FORWARD_ENV or k.startswith("HF_")}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in environ:
                raise SystemExit(f"--env {name}: not set here; pass --env {name}=VALUE")
            value = environ[name]
        out[name] = value
    return out


def exports(env: Mapping[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


# ------------------------------------------------------------------------------------------------
# Running (or printing) commands
# ------------------------------------------------------------------------------------------------
class Shell:
    """Runs argv lists, or with dry_run prints them (shell-quoted) and runs nothing."""

    def __init__(self, dry_run: bool, out=sys.stdout) -> None:
        self.dry_run, self.out = dry_run, out

    def show(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, argv: Sequence[str], *, check: bool = True, capture: bool = False, note: str = "") -> str:
        self.show(("# " + note + "\n" if note else "") + shlex.join(argv))
        if self.dry_run:
            return ""
        res = subprocess.run(list(argv), check=check, text=True, capture_output=capture)
        return res.stdout if capture else ""

    def file(self, path: str, text: str) -> None:
        """Write a local file (printed as a heredoc under --dry-run)."""
        self.show(f"cat > {shlex.quote(path)} <<'EOF'\n{text}EOF")
        if not self.dry_run:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(text)


# ------------------------------------------------------------------------------------------------
# TPU pod slices
# ------------------------------------------------------------------------------------------------
class Tpu:
    """gcloud commands for one slice."""

    def __init__(self, args: argparse.Namespace, sh: Shell) -> None:
        self.a, self.sh = args, sh
        self.where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])

    def gcloud(self, *words: str) -> list[str]:
        return ["gcloud", "compute", "tpus", *words, *self.where]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return self.gcloud("tpu-vm", "ssh", self.a.name, f"--worker={worker}", "--command", command)

    def state(self) -> str | None:
        """The slice's state (ACTIVE, WAITING_FOR_RESOURCES, ...) or None when it does not exist."""
        kind = ["queued-resources"] if self.a.queued else ["tpu-vm"]
        fmt = "value(state.state)" if self.a.queued else "value(state)"
        argv = self.gcloud(*kind, "describe", self.a.name, f"--format={fmt}")
        if self.sh.dry_run:
            self.sh.run(argv, note="does the slice exist? (reused when it does)")
            return None
        res = subprocess.run(argv, text=True, capture_output=True)
        return res.stdout.strip() or None if res.returncode == 0 else None

    def up(self) -> None:
        a = self.a
        state = self.state()
        if state == "ACTIVE" or (state and not a.queued):
            self.sh.show(f"# slice {a.name} exists ({state}): reused")
            return
        version = a.runtime_version or RUNTIME_VERSIONS[a.accelerator.rsplit("-", 1)[0]]
        tier = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
        if state is None:
            if a.queued:
                self.sh.run(self.gcloud("queued-resources", "create", a.name, "--node-id", a.name,
                                        "--accelerator-type", a.accelerator, "--runtime-version", version, *tier),
                            note="only when the slice does not exist: a queued resource")
            else:
                self.sh.run(self.gcloud("tpu-vm", "create", a.name, "--accelerator-type", a.accelerator,
                                        "--version", version, *tier), note="only when the slice does not exist")
        if self.sh.dry_run:
            self.sh.show(f"# then wait until the state is ACTIVE (polled every {POLL_S} s)")
            return
        while a.queued and self.state() != "ACTIVE":
            print(f"waiting for slice {a.name}: {self.state()}", file=sys.stderr, flush=True)
            time.sleep(POLL_S)

    def delete(self) -> None:
        kind = "queued-resources" if self.a.queued else "tpu-vm"
        extra = ["--force"] if self.a.queued else []
        self.sh.run(self.gcloud(kind, "delete", self.a.name, "--quiet", *extra))


def code_archive(args: argparse.Namespace, sh: Shell, staging: str) -> tuple[str, str]:
    """(local file to copy, the remote install command) for the code at --git-rev or the --wheel."""
    extras = EXTRAS_TPU if args.cmd == "tpu" else EXTRAS_GPU
    if args.wheel:
        name = os.path.basename(args.wheel)
        return args.wheel, f'pip install -q "./{name}[{extras}]"'
    rev = args.git_rev
    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", f"{rev}^{{commit}}"], check=True, text=True,
                             capture_output=True).stdout.strip()
    tar = os.path.join(staging, "code.tar.gz")
    sh.run(["git", "-C", REPO, "archive", "--format=tar.gz", "--prefix=rwml-jax/", "-o", tar, rev],
           note=f"the code at {rev}")
    return tar, f'tar xzf code.tar.gz && pip install -q -e "./rwml-jax[{extras}]"'


def setup_script(install: str, models: Sequence[str], env: Mapping[str, str]) -> str:
    """Runs once per worker: virtualenv, the package, model weights into the host's cache, stale locks."""
    fetch = ""
    if models:
        names = ", ".join(repr(m) for m in models)
        fetch = ("# model weights: once per host into its Hugging Face cache (the run finds them there)\n"
                 f'python -c "from huggingface_hub import snapshot_download as d; [d(m) for m in ({names},)]"\n')
    return ("#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + exports(env)
            + "python3 -m venv .venv\n. .venv/bin/activate\npip install -q --upgrade pip\n" + install + "\n" + fetch
            + "# stale accelerator locks left by a killed run\n"
            + "sudo rm -f /tmp/libtpu_lockfile\n"
            + "pids=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u || true)\n"
            + 'if [ -n "$pids" ]; then sudo kill -9 $pids || true; fi\n')


WORKER_ID = ("W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/"
             "attributes/agent-worker-number || echo ${TPU_WORKER_ID:-0})\n")


def run_script(cli_args: Sequence[str], env: Mapping[str, str]) -> str:
    """Starts the worker's process detached; its log, pid and exit code go to logs/worker-<i>.*"""
    cmd = shlex.join([".venv/bin/python", "-m", "rwml_jax.cli", *cli_args])
    inner = f'{cmd} > logs/worker-$W.log 2>&1; echo $? > logs/worker-$W.rc'
    return ("#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + WORKER_ID + "mkdir -p logs\n"
            + "rm -f logs/worker-$W.rc\n" + exports({"RWML_DISTRIBUTED": "1", "PYTHONUNBUFFERED": "1",
                                                     "LITELLM_LOCAL_MODEL_COST_MAP": "True", **env})
            + f"W=$W setsid nohup bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &\n"
            + "echo $! > logs/worker-$W.pid\n")


STATUS_SCRIPT = ("#!/usr/bin/env bash\ncd \"$(dirname \"$0\")\"\n" + WORKER_ID
                 + 'if [ -f logs/worker-$W.rc ]; then echo "worker $W rc $(cat logs/worker-$W.rc)"; '
                 + 'elif kill -0 "$(cat logs/worker-$W.pid 2>/dev/null)" 2>/dev/null; then echo "worker $W running"; '
                 + 'else echo "worker $W lost"; fi\n')
STOP_SCRIPT = ("#!/usr/bin/env bash\ncd \"$(dirname \"$0\")\"\n" + WORKER_ID
               + 'pid=$(cat logs/worker-$W.pid 2>/dev/null || true)\n'
               + 'if [ -n "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true; sleep 5; '
               + 'kill -KILL -- "-$pid" 2>/dev/null || true; fi\n'
               + 'sudo rm -f /tmp/libtpu_lockfile\n')


def parse_status(text: str) -> dict[int, str]:
    """{worker: "running" | "lost" | "rc N"} from the status script's lines of all workers."""
    out = {}
    for m in re.finditer(r"worker (\d+) (running|lost|rc -?\d+)", text):
        out[int(m.group(1))] = m.group(2)
    return out


def tpu_run(args: argparse.Namespace, sh: Shell, environ: Mapping[str, str]) -> int:
    tpu = Tpu(args, sh)
    hosts = tpu_hosts(args.accelerator)
    run_id = args.run_id or _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    remote = f"{RUNS_DIR}/{run_id}"
    staging = os.path.join(args.staging_dir, run_id)
    sh.show(f"# slice {args.name}: {args.accelerator}, {hosts} worker(s); run {run_id} in ~/{remote} on each")
    tpu.up()
    env = forwarded_env(environ, args.env)
    code, install = code_archive(args, sh, staging)
    scripts = {"setup.sh": setup_script(install, args.model, env), "run.sh": run_script(args.cli, env),
               "status.sh": STATUS_SCRIPT, "stop.sh": STOP_SCRIPT}
    for name, text in scripts.items():
        sh.file(os.path.join(staging, name), text)
    sh.run(tpu.ssh(f"mkdir -p {remote}"))
    sh.run(tpu.gcloud("tpu-vm", "scp", code, *[os.path.join(staging, n) for n in scripts], f"{args.name}:{remote}/",
                      "--worker=all"))
    sh.run(tpu.ssh(f"bash {remote}/setup.sh > {remote}/setup.log 2>&1 || (tail -n 30 {remote}/setup.log; exit 1)"),
           note="on every worker: install, fetch the models, clean stale locks")
    sh.run(tpu.ssh(f"bash {remote}/run.sh"), note="start detached on every worker")
    if args.detach:
        sh.show(f"# detached: python launch/pod.py tpu attach --name {args.name} --zone {args.zone} --run-id {run_id}")
        return 0
    return tpu_attach(args, sh, run_id, hosts)


def tpu_attach(args: argparse.Namespace, sh: Shell, run_id: str, hosts: int | None = None) -> int:
    """Stream worker 0's log; poll every worker; stop all when one fails. Returns the run's exit code."""
    tpu = Tpu(args, sh)
    remote = f"{RUNS_DIR}/{run_id}"
    tail = tpu.ssh(f"tail -n +1 -F {remote}/logs/worker-0.log", worker="0")
    status = tpu.ssh(f"bash {remote}/status.sh")
    stop = tpu.ssh(f"bash {remote}/stop.sh")
    if sh.dry_run:
        sh.run(tail, note="stream worker 0's log")
        sh.run(status, note=f"every {POLL_S} s: each worker's state (running / rc N)")
        sh.run(stop, note="when a worker fails: stop every worker")
        return 0
    streamer = subprocess.Popen(tail)
    try:
        while True:
            time.sleep(POLL_S)
            res = subprocess.run(status, text=True, capture_output=True)
            states = parse_status(res.stdout)
            failed = {w: s for w, s in states.items() if s == "lost" or (s.startswith("rc ") and s != "rc 0")}
            if failed:
                print(f"worker(s) failed: {failed}; stopping every worker", file=sys.stderr, flush=True)
                subprocess.run(stop)
                return 1
            if states and (hosts is None or len(states) >= hosts) and all(s == "rc 0" for s in states.values()):
                print(f"all {len(states)} workers finished", file=sys.stderr, flush=True)
                return 0
    except KeyboardInterrupt:
        print(f"detached; the run goes on (tpu attach --run-id {run_id}, tpu stop --run-id {run_id})", file=sys.stderr)
        return 130
    finally:
        streamer.terminate()


# ------------------------------------------------------------------------------------------------
# SLURM GPU clusters
# ------------------------------------------------------------------------------------------------
def sbatch_script(args: argparse.Namespace, install: str, env: Mapping[str, str]) -> str:
    """An sbatch script: one task per node, setup once per node, then the run with kill-on-bad-exit."""
    run_dir = os.path.join(args.shared_dir, args.run_id)
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={args.gpus_per_node}",
             f"#SBATCH --cpus-per-task={args.cpus_per_task}", f"#SBATCH --time={args.time}",
             f"#SBATCH --output={run_dir}/logs/sbatch-%j.log"]
    lines += [f"#SBATCH --partition={args.partition}"] if args.partition else []
    lines += [f"#SBATCH --account={args.account}"] if args.account else []
    lines += ["set -euo pipefail", f"cd {shlex.quote(run_dir)}", "mkdir -p logs", exports(env).rstrip("\n")]
    lines += ["export HF_HOME=${HF_HOME:-" + shlex.quote(os.path.join(args.shared_dir, "hf_cache")) + "}",
              "# the code and its virtualenv, once (the run folder is on the shared file system)",
              "if [ ! -f .venv/.installed ]; then",
              "  python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip",
              f"  {install}", "  touch .venv/.installed", "fi"]
    if args.model:
        names = ", ".join(repr(m) for m in args.model)
        lines += ["# model weights once into the shared cache",
                  f'.venv/bin/python -c "from huggingface_hub import snapshot_download as d; [d(m) for m in ({names},)]"']
    cmd = shlex.join([".venv/bin/python", "-m", "rwml_jax.cli", *args.cli])
    lines += ["export RWML_COORDINATOR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):"
              f"{args.port}", "export RWML_NUM_PROCESSES=$SLURM_NNODES PYTHONUNBUFFERED=1",
              "# one task per node; a failed task ends the job (--kill-on-bad-exit); one log per task",
              "srun --kill-on-bad-exit=1 --output=logs/worker-%t.log bash -c "
              + shlex.quote(f"RWML_PROCESS_ID=$SLURM_PROCID exec {cmd}")]
    return "\n".join(lines) + "\n"


def slurm_run(args: argparse.Namespace, sh: Shell, environ: Mapping[str, str]) -> int:
    args.run_id = args.run_id or _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(args.shared_dir, args.run_id)
    env = forwarded_env(environ, args.env)
    sh.run(["mkdir", "-p", os.path.join(run_dir, "logs")])
    code, install = code_archive(args, sh, run_dir)
    if args.wheel:
        sh.run(["cp", code, run_dir])
    script = os.path.join(run_dir, "job.sbatch")
    sh.file(script, sbatch_script(args, install, env))
    out = sh.run(["sbatch", "--parsable", script], capture=True)
    sh.show(f"# logs: {run_dir}/logs/worker-<i>.log (worker 0: tail -F {run_dir}/logs/worker-0.log)")
    if out and not args.detach:
        sh.run(["tail", "-n", "+1", "-F", os.path.join(run_dir, "logs", "worker-0.log")], check=False)
    return 0


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
        p.add_argument("--run-id", default="", help="names the run's folder (default: the UTC time)")

    def shipping(p: argparse.ArgumentParser) -> None:
        p.add_argument("--git-rev", default="HEAD", help="ship this checkout's code at this revision (git archive)")
        p.add_argument("--wheel", default="", help="ship this wheel instead (python -m build --wheel)")
        p.add_argument("--env", action="append", default=[], help="NAME or NAME=VALUE to forward (repeatable)")
        p.add_argument("--model", action="append", default=[], help="hub model to fetch once per host (repeatable)")
        p.add_argument("--detach", action="store_true", help="return once started")
        p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the rwml-jax arguments (run RECIPE ...)")

    tpu = sub.add_parser("tpu", help="a TPU pod slice (gcloud)")
    tsub = tpu.add_subparsers(dest="action", required=True)
    for action in ("run", "attach", "stop", "delete"):
        p = tsub.add_parser(action)
        common(p)
        p.add_argument("--name", required=True, help="the slice (queued resource / TPU VM) name")
        p.add_argument("--zone", required=True)
        p.add_argument("--project", default="")
        p.add_argument("--no-queued", dest="queued", action="store_false", help="tpu-vm create, not a queued resource")
        if action == "run":
            p.add_argument("--accelerator", required=True, help="v5p-64, v6e-16, v5litepod-32, v4-32, ...")
            p.add_argument("--runtime-version", default="", help="default: the generation's (RUNTIME_VERSIONS)")
            tier = p.add_mutually_exclusive_group()
            tier.add_argument("--spot", action="store_true")
            tier.add_argument("--reserved", action="store_true")
            p.add_argument("--staging-dir", default=os.path.join(REPO, ".launch"), help="local copies of the scripts")
            shipping(p)

    slurm = sub.add_parser("slurm", help="a multi-node GPU cluster (SLURM sbatch)")
    ssub = slurm.add_subparsers(dest="action", required=True)
    p = ssub.add_parser("run")
    common(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=32)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--job-name", default="rwml-jax")
    p.add_argument("--port", type=int, default=8476, help="the jax.distributed coordinator's port on node 0")
    p.add_argument("--shared-dir", default=os.path.expanduser("~/rwml-jax-runs"),
                   help="a folder every node sees (code, virtualenv, logs, model cache)")
    shipping(p)
    return ap


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, out=sys.stdout) -> int:
    args = parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    sh = Shell(args.dry_run, out)
    if getattr(args, "cli", None) is not None:
        args.cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
        if not args.cli:
            raise SystemExit("give the rwml-jax arguments after --, e.g. -- run rwml_alfworld --config.work_dir=gs://...")
    if args.cmd == "slurm":
        return slurm_run(args, sh, environ)
    if args.action == "run":
        return tpu_run(args, sh, environ)
    if args.action == "delete":
        Tpu(args, sh).delete()
        return 0
    if not args.run_id:
        raise SystemExit(f"tpu {args.action}: give --run-id (printed when the run started)")
    if args.action == "stop":
        sh.run(Tpu(args, sh).ssh(f"bash {RUNS_DIR}/{args.run_id}/stop.sh"))
        return 0
    return tpu_attach(args, sh, args.run_id)


if __name__ == "__main__":
    sys.exit(main())
