"""Recipe configs: loading, overrides with types, validation errors, the paper numbers, shape presets
(checked against PyTorch transformers on the meta device), and the dry-run plan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rwml_jax.config import (
    ConfigError,
    apply_overrides,
    available_recipes,
    config_to_dict,
    configs_dir,
    flatten,
    import_configs_module,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parent.parent


# ---- recipes -------------------------------------------------------------------------------------
def test_recipes_are_found():
    assert configs_dir() == REPO / "configs"
    assert {"rwml_alfworld", "rwml_tau2", "demo_cpu"} <= set(available_recipes())


@pytest.mark.parametrize("name", ["rwml_alfworld", "rwml_tau2", "demo_cpu", "demo_cpu:smoke"])
def test_every_recipe_loads_validates_and_is_locked(name):
    c = load_config(name)
    assert c.stages[0] in ("warmstart", "collect")
    with pytest.raises(AttributeError):
        c.rwml.new_field = 1  # locked: no new keys
    c.rwml.learning_rate = 3e-6  # values stay assignable (type-checked)
    with pytest.raises(TypeError):
        c.rwml.group_size = "many"


def test_paper_alfworld_recipe_numbers():
    c = load_config("rwml_alfworld")
    assert c.model.path == "Qwen/Qwen2.5-7B-Instruct"
    assert c.embedder.path == "Qwen/Qwen3-Embedding-8B"
    assert (c.env.name, c.env.max_steps) == ("alfworld", 30)
    assert (c.collect.num_tasks, c.collect.trajectories_per_task, c.collect.temperature) == (2048, 3, 1.0)
    assert c.triplets.val_fraction == 0.1
    assert (c.filter.num_samples, c.filter.threshold_observation, c.filter.keep_easy_prob, c.filter.tau_easy) == (10, 0.1, 0.1, 1.0)
    assert (c.rwml.epochs, c.rwml.learning_rate, c.rwml.batch_prompts, c.rwml.group_size) == (2, 1e-6, 32, 8)
    assert (c.rwml.kl_coef, c.rwml.kl_estimator, c.rwml.clip_eps_low, c.rwml.clip_eps_high) == (0.01, "k3", 0.2, 0.2)
    assert (c.rwml.max_prompt_tokens, c.rwml.max_new_tokens) == (2048, 512)
    assert c.rewards.threshold_observation == 0.2 and c.rewards.kind == "embedding"
    assert (c.wm_sft.learning_rate, c.wm_sft.epochs) == (2e-6, 2)
    # float32 master weights: an lr-1e-6 update would vanish in bfloat16
    assert c.model.dtype == "float32"


def test_paper_tau2_recipe_numbers():
    c = load_config("rwml_tau2")
    assert c.model.path == "Qwen/Qwen3-8B" and c.embedder.path == "Qwen/Qwen3-Embedding-8B"
    assert c.env.name == "tau2" and set(c.env.domains) == {"airline", "retail", "telecom"}
    assert (c.collect.num_tasks, c.collect.trajectories_per_task) == (-1, 6)
    assert c.rwml.group_size == 16 and c.triplets.mask_tool_schema
    assert (c.filter.threshold_user_reply, c.rewards.threshold_user_reply, c.rewards.rouge_grid) == (0.15, 0.4, 0.2)


def test_demo_recipe_is_cpu_sized():
    c = load_config("demo_cpu")
    assert c.stages[0] == "warmstart" and c.model.preset and not c.model.path
    assert c.embedder.path == "minilm" and c.env.data_dir == "generated"
    from rwml_jax.train.plan import model_info

    n = model_info("", c.model.preset).num_params
    assert 0.5e6 < n < 6e6
    smoke = load_config("demo_cpu:smoke")
    assert smoke.env.num_generated_games < c.env.num_generated_games and smoke.rwml.max_steps < c.rwml.max_steps
    with pytest.raises(ConfigError, match="unknown variant 'turbo'"):
        load_config("demo_cpu:turbo")


def test_every_base_field_is_commented():
    """Each `c.section.field = value` assignment in configs/base.py carries a comment (same or previous line)."""
    lines = (REPO / "configs" / "base.py").read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*(c(?:\.\w+)+)\s*=\s*(.*)$", line)
        if not m or "ConfigDict()" in m.group(2):
            continue
        prev = lines[i - 1].strip() if i else ""
        # SFT-style fields (epochs, batch_size, ...) are documented on their section's header line
        self_explanatory = re.search(r"\.(epochs|batch_size|micro_batch_size|warmup_steps|learning_rate|b1|b2|eps)\s*=", line)
        if "#" not in m.group(2) and not prev.startswith("#") and not self_explanatory:
            uncommented.append(line.strip())
    assert not uncommented, uncommented


def test_allowed_values_are_those_of_the_code_that_acts_on_them():
    from rwml_jax import platform
    from rwml_jax.envs.alfworld_data import TASK_TYPES
    from rwml_jax.rl import grpo

    for key, allowed in [("rwml.kl_estimator", grpo.KL_ESTIMATORS), ("rwml.loss_agg", grpo.LOSS_AGGS),
                         ("execution.remat", platform.REMAT_POLICIES), ("execution.layer_loop", platform.LAYER_LOOPS),
                         ("execution.weight_format", platform.WEIGHT_FORMATS),
                         ("execution.attention", platform.ATTENTION_KERNELS)]:
        for value in allowed:
            assert flatten(load_config("rwml_alfworld", [f"--config.{key}={value}"]))[key] == value
        with pytest.raises(ConfigError, match=re.escape(f"{key}='bogus': expected one of {', '.join(map(repr, allowed))}")):
            load_config("rwml_alfworld", [f"--config.{key}=bogus"])
    assert load_config("rwml_alfworld", [f"--config.env.task_types={','.join(TASK_TYPES)}"]).env.task_types == TASK_TYPES


def test_execution_options_are_not_model_fields():
    c = load_config("rwml_alfworld")
    assert set(c.execution) == {"remat", "layer_loop", "weight_format", "attention", "compilation_cache"}
    assert not {"remat", "layer_loop", "weight_format"} & set(c.model)
    assert load_config("demo_cpu").execution.remat == "none"
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.remat'; did you mean 'execution\.remat'\?"):
        load_config("rwml_alfworld", ["--config.model.remat=none"])


# ---- errors --------------------------------------------------------------------------------------
def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'rwml\.learnig_rate'; did you mean 'rwml\.learning_rate'\?"):
        load_config("rwml_alfworld", ["--config.rwml.learnig_rate=2e-6"])
    with pytest.raises(ConfigError, match=r"did you mean 'rwml\.group_size'"):
        load_config("rwml_alfworld", ["--config.rwlm.group_size=4"])  # mistyped section
    with pytest.raises(ConfigError, match=r"did you mean 'filter\.keep_easy_prob'"):
        load_config("rwml_alfworld", ["--config.filter.keep_prob=0.2"])
    with pytest.raises(ConfigError, match="unknown recipe 'rwml_alfwrld'; did you mean 'rwml_alfworld'"):
        load_config("rwml_alfwrld")


def test_wrong_types_are_rejected_with_the_field_name():
    with pytest.raises(ConfigError, match=r"'rwml\.group_size' is an int; got 'eight'"):
        load_config("rwml_alfworld", ["--config.rwml.group_size=eight"])
    with pytest.raises(ConfigError, match=r"'rwml\.group_size' is an int; got '8\.5'"):
        load_config("rwml_alfworld", ["--config.rwml.group_size=8.5"])
    with pytest.raises(ConfigError, match=r"'filter\.enabled' is a bool"):
        load_config("rwml_alfworld", ["--config.filter.enabled=maybe"])
    with pytest.raises(ConfigError, match=r"'rwml\.learning_rate' is a float"):
        load_config("rwml_alfworld", ["--config.rwml.learning_rate=fast"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config("rwml_alfworld", ["--config.rwml=3"])
    with pytest.raises(ConfigError, match="unrecognized argument '--lr=3'"):
        load_config("rwml_alfworld", ["--lr=3"])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config("rwml_alfworld", ["--config.rwml.group_size"])


@pytest.mark.parametrize("override, message", [
    ("rwml.kl_estimator=k2", r"rwml\.kl_estimator='k2': expected one of 'k1', 'k3'"),
    ("rwml.loss_agg=sum", r"rwml\.loss_agg='sum': expected one of 'token-mean'"),
    ("env.name=webshop", r"env\.name='webshop': expected one of 'alfworld', 'tau2'"),
    ("rewards.kind=vibes", r"rewards\.kind='vibes'"),
    ("rewards.kind=judge", r"rewards\.judge='': rewards\.kind='judge' needs a judge"),
    ("rewards.kind=bleu", r"rewards\.kind='bleu': expected one of 'embedding', 'judge'"),
    ("rewards.judge=litellm:gpt-4.1", r"rewards\.judge='litellm:gpt-4\.1': is set but rewards\.kind is not"),
    ("rewards.status_penalty=0.5", r"rewards\.status_penalty=0\.5: scores a task-status line"),
    ("execution.remat=some", r"execution\.remat='some'"),
    ("execution.layer_loop=loop", r"execution\.layer_loop='loop': expected one of 'auto', 'scan', 'unroll'"),
    ("execution.weight_format=fast", r"execution\.weight_format='fast': expected one of 'auto', 'out_in'"),
    ("filter.keep_easy_prob=1.5", r"filter\.keep_easy_prob=1\.5: must be in \[0\.0, 1\.0\]"),
    ("filter.tau_easy=-0.1", r"filter\.tau_easy=-0\.1: must be in"),
    ("rwml.group_size=1", r"rwml\.group_size=1: must be in \[2"),
    ("rwml.batch_prompts=0", r"rwml\.batch_prompts=0"),
    ("rwml.micro_batch_size=7", r"rwml\.micro_batch_size=7: must divide .* \(256\)"),
    ("triplets.val_fraction=1.0", r"triplets\.val_fraction=1\.0"),
    ("env.task_types=pick_and_place,look_at_obj_in_light", r"unknown value\(s\) \['pick_and_place'\]"),
    ("stages=rwml,collect", r"pipeline order"),
    ("stages=collect,train", r"unknown value\(s\) \['train'\]"),
    ("model.preset=tinny", r"did you mean 'tiny'"),
    ("mesh.fsdp=0", r"mesh\.fsdp=0"),
    ("env.data_dir=generated", r"env\.num_generated_games=0: env\.data_dir='generated' needs"),
    ("warmstart.corpus=oracle", r"warmstart\.corpus='oracle': expected one of 'walkthrough', 'explorer'"),
    ("warmstart.dagger_rounds=1", r"warmstart\.dagger_rounds=1: DAgger labels .* needs corpus='explorer'"),
    ("warmstart.dagger_steps=5", r"warmstart\.dagger_steps=5: has no effect without dagger_rounds > 0"),
])
def test_bad_values_are_rejected_naming_field_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("rwml_alfworld", [f"--config.{override}"])


def test_tau2_specific_validation():
    with pytest.raises(ConfigError, match=r"env\.domains=\('banking',\): unknown value"):
        load_config("rwml_tau2", ["--config.env.domains=banking"])
    with pytest.raises(ConfigError, match=r"env\.user='gpt4'"):
        load_config("rwml_tau2", ["--config.env.user=gpt4"])
    c = load_config("rwml_tau2", ["--config.env.user=litellm:gpt-4.1", "--config.env.user_alt=local:qwen3-0.6b"])
    assert (c.env.user, c.env.user_alt) == ("litellm:gpt-4.1", "local:qwen3-0.6b")
    for bad in ("local", "litellm:", "scripted:"):
        with pytest.raises(ConfigError, match=r"env\.user_alt="):
            load_config("rwml_tau2", [f"--config.env.user_alt={bad}"])


def test_all_errors_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config("rwml_alfworld", ["--config.rwml.kl_estimator=k2", "--config.mesh.data=-1", "--config.mesh.fsdp=-1"])
    assert "rwml.kl_estimator" in str(e.value) and "at most one of mesh" in str(e.value)


# ---- overrides -----------------------------------------------------------------------------------
def test_overrides_are_coerced_to_the_field_type():
    c = load_config("rwml_tau2", [
        "--config.rwml.learning_rate=2e-6",
        "--config.rwml.group_size", "4",  # space-separated form
        "--config.filter.enabled=false",
        "--config.triplets.drop_invalid",  # bare flag = True on a bool
        "--config.rwml.clip_eps_high=1",  # int text on a float field -> float
        "--config.env.domains=airline,retail",
        "--config.env.task_types=('pick_and_place_simple',)",
        "--config.rwml.micro_batch_size=16",
        "--config.model.path='/data/my model'",
        "--config.collect.num_tasks=1e3",
        "--config.seed=7",
    ])
    assert c.rwml.learning_rate == 2e-6 and isinstance(c.rwml.learning_rate, float)
    assert c.rwml.group_size == 4 and isinstance(c.rwml.group_size, int)
    assert c.filter.enabled is False and c.triplets.drop_invalid is True
    assert c.rwml.clip_eps_high == 1.0 and isinstance(c.rwml.clip_eps_high, float)
    assert c.env.domains == ("airline", "retail")
    assert c.env.task_types == ("pick_and_place_simple",)
    assert c.model.path == "/data/my model"
    assert c.collect.num_tasks == 1000 and c.seed == 7


def test_config_flags_syntax(tmp_path):
    """What ml_collections' config_flags parses: repeated flags for a tuple, --noconfig.KEY, --flagfile."""
    flagfile = tmp_path / "overrides.flags"
    flagfile.write_text("--config.seed=5\n--config.rwml.group_size=4\n")
    c = load_config("rwml_tau2", ["--config.env.domains=airline", "--config.env.domains", "retail",
                                  "--noconfig.filter.enabled", f"--flagfile={flagfile}"])
    assert c.env.domains == ("airline", "retail") and c.filter.enabled is False and (c.seed, c.rwml.group_size) == (5, 4)
    flagfile.write_text("--config.rwml.learnig_rate=1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'rwml\.learning_rate'"):
        load_config("rwml_tau2", [f"--flagfile={flagfile}"])
    with pytest.raises(ConfigError, match=r"unrecognized argument 'false'.*--config\.section\.key=false"):
        load_config("rwml_tau2", ["--config.filter.enabled", "false"])  # a bool's value needs the = form
    with pytest.raises(ConfigError, match=r"--config\.rwml\.group_size needs a value"):
        load_config("rwml_tau2", ["--config.rwml.group_size", "--config.seed=3"])


def test_tuple_elements_take_the_existing_element_type():
    import ml_collections

    c = ml_collections.ConfigDict({"sizes": (1, 2), "names": ("a",), "ratio": 0.5, "maybe": None})
    apply_overrides(c, ["--config.sizes=(3,4,5)", "--config.names=x,y", "--config.maybe=[1, 2]"])
    assert c.sizes == (3, 4, 5) and c.names == ("x", "y") and c.maybe == [1, 2]
    apply_overrides(c, ["--config.sizes=7,8"])
    assert c.sizes == (7, 8)
    with pytest.raises(ConfigError, match=r"sizes\[1\].* is an int"):
        apply_overrides(c, ["--config.sizes=1,b"])
    apply_overrides(c, ["--config.ratio=None"])
    assert c.ratio is None


def test_config_file_path_with_argument(tmp_path):
    p = tmp_path / "my_recipe.py"
    p.write_text(
        "from configs import base\n"
        "def get_config(arg=None):\n"
        "    c = base.get_config()\n"
        "    c.name = 'mine'\n"
        "    c.model.preset = 'tiny'\n"
        "    c.rwml.group_size = int(arg or 8)\n"
        "    return c\n")
    c = load_config(f"{p}:4", ["--config.seed=3"])
    assert (c.name, c.rwml.group_size, c.seed) == ("mine", 4, 3)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    assert load_config("demo_cpu.py:smoke").name == "demo_cpu_smoke"  # a recipe file name, from any directory


def test_save_config_round_trip(tmp_path):
    c = load_config("rwml_alfworld", ["--config.rwml.learning_rate=3e-6"])
    path = save_config(c, tmp_path / "run")
    assert path == tmp_path / "run" / "config.json"
    stored = json.loads(path.read_text())
    assert stored == config_to_dict(c) and stored["rwml"]["learning_rate"] == 3e-6
    assert stored["stages"] == list(c.stages)  # tuples as lists in JSON...
    assert "stages: !!python/tuple" in (tmp_path / "run" / "config.py.txt").read_text()  # ...types kept in the repr
    # the stored values override back into a fresh config to the same values
    flat = flatten(c)
    fresh = load_config("rwml_alfworld", [f"--config.rwml.learning_rate={flat['rwml.learning_rate']}"])
    assert flatten(fresh) == flat


# ---- shape presets -------------------------------------------------------------------------------
def _benchmark_shapes_table() -> dict[str, dict[str, str]]:
    """The "Model shapes" table of docs/benchmarks.md as {name: {column: cell}}."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    section = text.split("## Model shapes", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header, body = rows[0], rows[1:]
    return {r[0]: dict(zip(header, r)) for r in body}


def test_benchmark_presets_match_benchmarks_md():
    from rwml_jax.train.plan import model_info

    table = _benchmark_shapes_table()
    assert sorted(table) == ["qwen3-0.6b", "qwen3-1.7b", "small", "tiny"]
    expected = {"tiny": 5.05e6, "small": 100.1e6, "qwen3-0.6b": 596e6, "qwen3-1.7b": 1.72e9}
    models = import_configs_module("models")
    scale = {"M": 1e6, "B": 1e9}
    for name, n in expected.items():
        row = table[name]
        assert float(row["params"][:-1]) * scale[row["params"][-1]] == pytest.approx(n), (name, row["params"])
        got = model_info("", name).num_params
        assert abs(got - n) / n < 0.002, (name, got)
        p = models.preset(name)
        assert (p["vocab_size"], p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"],
                p["num_key_value_heads"], p["head_dim"], p["intermediate_size"]) == \
            tuple(int(row[c]) for c in ("vocab", "hidden", "layers", "heads", "kv heads", "head_dim",
                                        "intermediate")), name
        assert p["tie_word_embeddings"] == (row["tied embeddings"] == "yes"), name
        assert p["model_type"] == "qwen3" and p["rope_theta"] == 1e6, name
    tiny = models.preset("tiny")
    assert (tiny["vocab_size"], tiny["hidden_size"], tiny["num_hidden_layers"], tiny["num_attention_heads"],
            tiny["num_key_value_heads"], tiny["head_dim"], tiny["intermediate_size"], tiny["tie_word_embeddings"]) == \
        (8192, 256, 4, 4, 2, 64, 704, True)
    assert models.preset_for("Qwen/Qwen2.5-7B-Instruct") == "qwen2.5-7b-instruct"
    assert models.preset_for("/models/Qwen3-8B/") == "qwen3-8b"


@pytest.mark.slow  # ~30 s: imports torch + transformers and builds 8B-parameter models on the meta device
def test_preset_parameter_counts_match_transformers():
    """Count parameters of the real PyTorch classes (meta device: no memory) for every preset."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rwml_jax.train.plan import hf_num_params

    models = import_configs_module("models")
    for name in models.PRESETS:
        d = models.preset(name)
        d.pop("embedding", None)
        cfg = transformers.AutoConfig.for_model(**d)
        embedder = name in ("qwen3-embedding-8b", "minilm")
        with torch.device("meta"):
            model = (transformers.AutoModel if embedder else transformers.AutoModelForCausalLM).from_config(cfg)
        n_torch = sum(p.numel() for p in model.parameters())
        assert hf_num_params(models.preset(name), lm_head=not embedder) == n_torch, name


# ---- dry run ---------------------------------------------------------------------------------------
def test_dry_run_plan_alfworld():
    from rwml_jax.train.plan import describe_plan

    text = describe_plan(load_config("rwml_alfworld"), num_devices=8)
    assert "Stages: collect -> triplets -> filter -> rwml -> wm_sft" in text
    assert "data 1 x fsdp 8 x expert 1 x tensor 1" in text
    assert "7.62B parameters" in text and "7.57B parameters" in text
    assert "2,048" in text and "6,144 episodes" in text
    assert "~15,813" in text  # the paper's final set
    assert f"= {15813 // 32 * 2:,} steps" in text  # rwml: 2 epochs of 32-prompt batches
    assert "256 sequences/step in 4 micro-batches of 64; prompts shared by 8 rows" in text  # a group per device
    assert "Execution: remat full, layer loop auto, decode weight format auto" in text
    # memory per device at 8-way fsdp: (4 + 4 + 8) bytes/param f32 train state + 2 bytes bf16 reference + bf16 embedder
    m = re.search(r"Memory per device .*?: ([\d.]+) GiB", text)
    expect = (7_615_616_512 * (4 + 4 + 8 + 2) + 7_567_295_488 * 2) / 8 / 1024**3
    assert abs(float(m.group(1)) - expect) < 0.01


def test_dry_run_plan_tau2_demo_and_bad_mesh():
    from rwml_jax.train.plan import describe_plan

    text = describe_plan(load_config("rwml_tau2"), num_devices=16)
    assert "τ² airline/retail/telecom" in text and "1,068 episodes" in text and "~5,578" in text
    assert "G=16 -> 512 sequences/step" in text and "fsdp 16" in text
    cfg = load_config("demo_cpu")
    demo = describe_plan(cfg)
    assert demo.startswith("Plan for recipe 'demo_cpu'") and "warmstart" in demo and "micro" in demo
    cap = cfg.rwml.max_steps  # ~219 triplets x epochs / batch_prompts exceeds the cap
    assert 219 * cfg.rwml.epochs // cfg.rwml.batch_prompts > cap
    assert f"= {cap} steps (capped by max_steps={cap})" in demo
    bad = describe_plan(load_config("rwml_alfworld", ["--config.mesh.data=4", "--config.mesh.fsdp=-1"]), num_devices=6)
    assert "WARNING: 6 devices are not divisible" in bad


def test_plan_states_training_reward_split_users_and_served_models():
    from rwml_jax.train.plan import describe_plan

    judge = describe_plan(load_config("rwml_alfworld:judge"))
    assert "training reward: LLM judge local:Qwen/Qwen2.5-7B-Instruct" in judge and "[ablation]" in judge
    assert "held-out reward (embedding, d < 0.2)" in judge and "wm_sft" not in judge.split("Stages")[1]
    assert "judge local:Qwen/Qwen2.5-7B-Instruct (7.62B parameters" in judge
    plain = describe_plan(load_config("rwml_alfworld"))
    assert "training reward: embedding, d < 0.2" in plain and "LLM judge" not in plain
    assert "10% of the tasks, whole tasks on one side" in plain
    assert "of the triplets" in describe_plan(load_config("rwml_alfworld", ["--config.triplets.split_by=triplet"]))
    tau2 = describe_plan(load_config("rwml_tau2", ["--config.env.user_alt=litellm:gpt-4.1"]))
    assert "user simulators local:Qwen/Qwen3-8B (3 of each task's 6) and litellm:gpt-4.1 (3)" in tau2
    assert "user simulator local:Qwen/Qwen3-8B (8.19B parameters" in tau2
    scripts = describe_plan(load_config("rwml_tau2:scripts"))
    assert "-0.1 without a <think> of > 16 words" in scripts and "history H=5" in scripts
