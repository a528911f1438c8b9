"""launch/pod.py --dry-run prints the exact commands for a v5p-64 and a v6e-16 slice and a SLURM job, and
runs none of them (no gcloud / sbatch here)."""

from __future__ import annotations

import importlib.util
import io
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pod", REPO / "launch" / "pod.py")
pod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pod)

ENV = {"ALFWORLD_DATA": "/data/alfworld", "HF_TOKEN": "hf_secret", "HOME": "/home/me", "UNRELATED": "x"}
CLI = ["run", "rwml_alfworld", "--config.work_dir=gs://bucket/runs/alf", "--config.mesh.fsdp=32"]


def dry_run(argv: list[str], environ=ENV) -> list[str]:
    out = io.StringIO()
    assert "--" in argv
    assert pod.main([*argv[:2], "--dry-run", *argv[2:]], environ=environ, out=out) == 0
    return out.getvalue().splitlines()


def scripts(lines: list[str]) -> dict[str, str]:
    """{file name: content} of the heredocs a dry run prints."""
    out, name, body = {}, None, []
    for line in lines:
        if name is None and line.startswith("cat > ") and line.endswith("<<'EOF'"):
            name, body = Path(shlex.split(line)[2]).name, []
        elif name is not None and line == "EOF":
            out[name], name = "\n".join(body) + "\n", None
        elif name is not None:
            body.append(line)
    return out


def test_worker_counts():
    assert [pod.tpu_hosts(a) for a in ("v5p-8", "v5p-64", "v4-32", "v6e-8", "v6e-16", "v5litepod-256")] == [1, 8, 4, 1, 4, 64]
    with pytest.raises(SystemExit, match="expected v4-N"):
        pod.tpu_hosts("v7-64")


def test_v5p_64_queued_spot_from_a_git_revision(tmp_path):
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not rev:
        pytest.skip("not a git checkout")
    stage = tmp_path / "stage"
    lines = dry_run(["tpu", "run", "--name", "rwml-v5p", "--zone", "us-east5-a", "--project", "proj",
                     "--accelerator", "v5p-64", "--spot", "--run-id", "r1", "--git-rev", rev, "--staging-dir", str(stage),
                     "--model", "Qwen/Qwen2.5-7B-Instruct", "--env", "WANDB_MODE=offline", "--", *CLI])
    where = "--zone us-east5-a --project proj"
    d = str(stage / "r1")
    ssh = "gcloud compute tpus tpu-vm ssh rwml-v5p --worker=all --command"
    commands = [x for x in lines if x.startswith(("gcloud ", "git "))]
    assert commands == [
        f"gcloud compute tpus queued-resources describe rwml-v5p '--format=value(state.state)' {where}",
        f"gcloud compute tpus queued-resources create rwml-v5p --node-id rwml-v5p --accelerator-type v5p-64 "
        f"--runtime-version v2-alpha-tpuv5 --spot {where}",
        f"git -C {REPO} archive --format=tar.gz --prefix=rwml-jax/ -o {d}/code.tar.gz {rev}",
        f"{ssh} 'mkdir -p rwml-jax-runs/r1' {where}",
        f"gcloud compute tpus tpu-vm scp {d}/code.tar.gz {d}/setup.sh {d}/run.sh {d}/status.sh {d}/stop.sh "
        f"rwml-v5p:rwml-jax-runs/r1/ --worker=all {where}",
        f"{ssh} 'bash rwml-jax-runs/r1/setup.sh > rwml-jax-runs/r1/setup.log 2>&1 || "
        f"(tail -n 30 rwml-jax-runs/r1/setup.log; exit 1)' {where}",
        f"{ssh} 'bash rwml-jax-runs/r1/run.sh' {where}",
        f"gcloud compute tpus tpu-vm ssh rwml-v5p --worker=0 --command "
        f"'tail -n +1 -F rwml-jax-runs/r1/logs/worker-0.log' {where}",
        f"{ssh} 'bash rwml-jax-runs/r1/status.sh' {where}",
        f"{ssh} 'bash rwml-jax-runs/r1/stop.sh' {where}",
    ]
    assert lines[0] == "# slice rwml-v5p: v5p-64, 8 worker(s); run r1 in ~/rwml-jax-runs/r1 on each"
    assert not stage.exists()  # a dry run writes nothing
    sc = scripts(lines)
    assert set(sc) == {"setup.sh", "run.sh", "status.sh", "stop.sh"}
    setup, run = sc["setup.sh"], sc["run.sh"]
    assert 'tar xzf code.tar.gz && pip install -q -e "./rwml-jax[tpu,envs,embed]"' in setup
    assert "snapshot_download as d; [d(m) for m in ('Qwen/Qwen2.5-7B-Instruct',)]" in setup
    assert "sudo rm -f /tmp/libtpu_lockfile" in setup and "lsof -t /dev/accel*" in setup
    for script in (setup, run):  # the environment is forwarded; unrelated variables are not
        assert "export ALFWORLD_DATA=/data/alfworld\n" in script and "export HF_TOKEN=hf_secret\n" in script
        assert "export WANDB_MODE=offline\n" in script and "UNRELATED" not in script and "HOME" not in script
    assert "export RWML_DISTRIBUTED=1\n" in run
    assert (".venv/bin/python -m rwml_jax.cli run rwml_alfworld --config.work_dir=gs://bucket/runs/alf "
            "--config.mesh.fsdp=32 > logs/worker-$W.log 2>&1; echo $? > logs/worker-$W.rc") in run
    assert "setsid nohup" in run and "agent-worker-number" in run
    # each script is valid bash
    for name, text in sc.items():
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, name


def test_v6e_16_reserved_from_a_wheel(tmp_path):
    stage = tmp_path / "stage"
    lines = dry_run(["tpu", "run", "--name", "rwml-v6e", "--zone", "europe-west4-a", "--accelerator", "v6e-16",
                     "--reserved", "--run-id", "r2", "--wheel", "dist/rwml_jax-0.1.0-py3-none-any.whl",
                     "--staging-dir", str(stage), "--detach", "--", *CLI], environ={})
    where = "--zone europe-west4-a"
    d = str(stage / "r2")
    commands = [x for x in lines if x.startswith(("gcloud ", "git "))]
    assert commands[:2] == [
        f"gcloud compute tpus queued-resources describe rwml-v6e '--format=value(state.state)' {where}",
        f"gcloud compute tpus queued-resources create rwml-v6e --node-id rwml-v6e --accelerator-type v6e-16 "
        f"--runtime-version v2-alpha-tpuv6e --reserved {where}",
    ]
    assert commands[3] == (f"gcloud compute tpus tpu-vm scp dist/rwml_jax-0.1.0-py3-none-any.whl {d}/setup.sh "
                           f"{d}/run.sh {d}/status.sh {d}/stop.sh rwml-v6e:rwml-jax-runs/r2/ --worker=all {where}")
    assert commands[-1] == f"gcloud compute tpus tpu-vm ssh rwml-v6e --worker=all --command 'bash rwml-jax-runs/r2/run.sh' {where}"
    assert not any(x.startswith("git ") for x in commands)  # detached: no streaming, no polling
    assert lines[0].startswith("# slice rwml-v6e: v6e-16, 4 worker(s)")
    assert 'pip install -q "./rwml_jax-0.1.0-py3-none-any.whl[tpu,envs,embed]"' in scripts(lines)["setup.sh"]


def test_slurm_sbatch_script(tmp_path):
    lines = dry_run(["slurm", "run", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--run-id", "r3",
                     "--shared-dir", str(tmp_path / "shared"), "--wheel", "w.whl", "--model", "Qwen/Qwen3-8B",
                     "--", *CLI])
    job = scripts(lines)["job.sbatch"]
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n" in job
    assert "srun --kill-on-bad-exit=1 --output=logs/worker-%t.log" in job
    assert "RWML_PROCESS_ID=$SLURM_PROCID exec .venv/bin/python -m rwml_jax.cli run rwml_alfworld" in job
    assert 'pip install -q "./w.whl[gpu,envs,embed]"' in job and "export ALFWORLD_DATA=/data/alfworld" in job
    assert f"sbatch --parsable {tmp_path / 'shared' / 'r3' / 'job.sbatch'}" in lines
    assert subprocess.run(["bash", "-n"], input=job, text=True).returncode == 0
    assert not (tmp_path / "shared").exists()


def test_status_parsing_and_missing_arguments():
    assert pod.parse_status("worker 0 running\nworker 1 rc 0\nworker 2 rc 137\nworker 3 lost\n") == {
        0: "running", 1: "rc 0", 2: "rc 137", 3: "lost"}
    with pytest.raises(SystemExit, match="give the rwml-jax arguments after --"):
        pod.main(["tpu", "run", "--name", "n", "--zone", "z", "--accelerator", "v6e-16", "--dry-run"], environ={})
    with pytest.raises(SystemExit, match="--env HF_X: not set here"):
        pod.main(["tpu", "run", "--name", "n", "--zone", "z", "--accelerator", "v6e-16", "--dry-run", "--env", "HF_X",
                  "--", "run", "demo_cpu"], environ={}, out=io.StringIO())
