"""The pipeline's stages, in the order `rwml-jax run` executes them (a recipe lists a subset, in this order).

A stage may run as several *instances* in one work dir, named ``<stage>@<instance>``: ``policy_rl@rwml``
is the policy-RL stage started from the rwml model, in its own folder ``<work_dir>/policy_rl@rwml`` (the
arms of the paper's Table 1 side by side). Only the stages in `INSTANCED` take instances; the instance
names they accept are listed there.
"""

STAGE_ORDER: tuple[str, ...] = ("warmstart", "collect", "triplets", "filter", "rwml", "wm_sft", "expert_sft", "policy_rl",
                                "eval")
# the stages whose output is a model (`<work_dir>/<stage>/model`), which `eval` can play
MODEL_STAGES: tuple[str, ...] = ("warmstart", "rwml", "wm_sft", "expert_sft", "policy_rl")
# policy_rl.init: the model policy RL starts from ("base" = model.path, or the warm start when the recipe
# has one; a stage name = that stage's model)
POLICY_RL_INITS: tuple[str, ...] = ("base", "wm_sft", "rwml", "expert_sft")
# stage -> the instance names `<stage>@<instance>` accepts
INSTANCED: dict[str, tuple[str, ...]] = {"policy_rl": POLICY_RL_INITS}
# stages that read only some of the stages before them (the others read every earlier stage's output)
READS: dict[str, tuple[str, ...]] = {"expert_sft": ("warmstart",)}


def stage_kind(name: str) -> str:
    """The stage a (possibly instanced) name runs: "policy_rl@rwml" -> "policy_rl"."""
    return name.split("@", 1)[0]


def stage_instance(name: str) -> str | None:
    """The instance of an instanced name ("policy_rl@rwml" -> "rwml"), None for a plain stage name."""
    return name.split("@", 1)[1] if "@" in name else None


def is_stage(name: str) -> bool:
    """Whether `name` is a stage of STAGE_ORDER or a valid instance of an instanced stage."""
    kind, inst = stage_kind(name), stage_instance(name)
    if kind not in STAGE_ORDER:
        return False
    return inst is None or inst in INSTANCED.get(kind, ())


def check_stage(name: str) -> str:
    """`name` when `is_stage(name)`, else ValueError listing the stages (and instances)."""
    if not is_stage(name):
        inst = ", ".join(f"{k}@{{{'|'.join(v)}}}" for k, v in INSTANCED.items())
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}; instances: {inst}")
    return name


def is_model_stage(name: str) -> bool:
    """Whether `name` (an instance included) is a stage whose output is a model."""
    return is_stage(name) and stage_kind(name) in MODEL_STAGES
