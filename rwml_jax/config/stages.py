"""The pipeline's stages, in the order `rwml-jax run` executes them (a recipe lists a subset, in this order)."""

STAGE_ORDER: tuple[str, ...] = ("warmstart", "collect", "triplets", "filter", "rwml", "wm_sft", "expert_sft", "eval")
# the stages whose output is a model (`<work_dir>/<stage>/model`), which `eval` can play
MODEL_STAGES: tuple[str, ...] = ("warmstart", "rwml", "wm_sft", "expert_sft")
# stages that read only some of the stages before them (the others read every earlier stage's output)
READS: dict[str, tuple[str, ...]] = {"expert_sft": ("warmstart",)}
