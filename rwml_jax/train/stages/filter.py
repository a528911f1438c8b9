"""Stage 3, `filter`: drop most of the triplets a next-state-SFT model π' already predicts.

π' is trained by next-state SFT on the validation split, samples K predictions per train triplet, and
those are scored with the stricter filter thresholds. A triplet is easy when its mean reward reaches
τ_easy (default 1.0: all K correct); easy triplets are kept with probability p, hard ones always.
Sampling progress is appended to `filter/rewards.jsonl`, so a killed run resumes where it stopped.
Output: `filter/kept.jsonl` (the final training set of RWML and WM-SFT).
"""

from __future__ import annotations

import logging
from typing import Any

from rwml_jax.models.hf_io import save_pretrained
from rwml_jax.rwml.easy_filter import filter_easy
from rwml_jax.rwml.triplets import Triplet
from rwml_jax.rwml.wm_prompts import wm_messages
from rwml_jax.train.metrics_log import MetricsLogger, progress
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.runtime import Runtime, resolve_model_path
from rwml_jax.train.sft_loop import fit_batch, train_sft
from rwml_jax.train.stage_io import Stage, append_jsonl, read_jsonl, write_jsonl
from rwml_jax.train.stages.triplets import load_split
from rwml_jax.train.wm_eval import reward_config, score, sft_examples

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("filter", "embedder", "rwml.max_prompt_tokens", "optimizer", "rewards.rouge_grid",
               "rewards.realized_instruction", "rewards.prediction_max_tokens", "rewards.rouge_stemmer")
# Of those, the ones that change speed or memory but not the output (fnmatch patterns).
IGNORED_KEYS = ("filter.batch_prompts", "embedder.batch_size")

log = logging.getLogger(__name__)


def final_train_set(rt: Runtime):
    """The triplets RWML / WM-SFT train on: the filter's output, or the whole train split without it."""

    if "filter" in rt.config.stages:
        return [Triplet.from_dict(d) for d in read_jsonl(rt.work_dir / "filter" / "kept.jsonl")]
    return load_split(rt, "train")


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    c = rt.config
    f = c.filter
    stage = Stage(rt.work_dir, "filter")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    train, val = load_split(rt, "train"), load_split(rt, "val")
    if not f.enabled:
        write_jsonl(stage.file("kept.jsonl"), [t.to_dict() for t in train])
        summary = {"enabled": False, "total": len(train), "kept": len(train)}
        stage.finish(c, summary=summary, outputs=["kept.jsonl"])
        return summary

    source = rt.policy_source() if not f.model else resolve_model_path(f.model, what="filter.model")
    model_config, start = rt.load_model(source)
    tokenizer = rt.tokenizer()
    policy = PolicySampler(model_config, tokenizer, rt.mesh, max_prompt_tokens=c.rwml.max_prompt_tokens,
                           max_new_tokens=f.max_new_tokens, weight_format=rt.execution(model_config).weight_format)
    model_dir = stage.file("filter_model")
    if (model_dir / "model.safetensors").exists():
        model_config, params = rt.load_model(str(model_dir))
    else:
        examples = sft_examples(policy, val, f.max_new_tokens)
        batch = fit_batch(f.sft.batch_size, len(examples), rt.mesh)
        logger = MetricsLogger.for_stage(stage.path, c)
        params, _ = train_sft(
            stage_dir=stage.path, mesh=rt.mesh, model_config=model_config, init_params=lambda: start,
            examples=examples, learning_rate=f.sft.learning_rate, epochs=f.sft.epochs, batch_size=batch,
            micro_batch_size=f.sft.micro_batch_size, warmup_steps=f.sft.warmup_steps, seed=c.seed,
            pad_id=tokenizer.pad_token_id, optimizer=c.optimizer, checkpoint_every=c.checkpoint.every_steps,
            keep=c.checkpoint.keep, logger=logger, desc="filter_sft", execution=rt.execution(model_config),
        )
        logger.close()
        save_pretrained(model_config, params, model_dir, tokenizer=tokenizer)

    strict = reward_config(c, strict=True)
    records = read_jsonl(stage.file("rewards.jsonl")) if stage.file("rewards.jsonl").exists() else []
    done = {r["id"]: r["rewards"] for r in records}
    cut = {r["id"]: r.get("truncated", 0) for r in records}
    todo = [t for t in train if t.id not in done]
    bar = progress(len(train), "filter", initial=len(train) - len(todo), unit="triplet")
    for lo in range(0, len(todo), f.batch_prompts):
        chunk = todo[lo:lo + f.batch_prompts]
        _, comps = policy.sample(params, [wm_messages(t) for t in chunk], n=f.num_samples, temperature=f.temperature,
                                 top_p=f.top_p, seed=c.seed * 7919 + len(train) - len(todo) + lo)
        rb = score([x.text for cs in comps for x in cs], chunk, rt.embedder, strict, repeat=f.num_samples)
        rows = [{"id": t.id, "rewards": rb.rewards[i * f.num_samples:(i + 1) * f.num_samples].tolist(),
                 "truncated": sum(x.truncated for x in comps[i])} for i, t in enumerate(chunk)]
        append_jsonl(stage.file("rewards.jsonl"), rows)
        done.update({r["id"]: r["rewards"] for r in rows})
        cut.update({r["id"]: r["truncated"] for r in rows})
        bar.update(len(chunk))
    bar.close()
    result = filter_easy({t.id: done[t.id] for t in train}, tau_easy=f.tau_easy, keep_easy_prob=f.keep_easy_prob, seed=c.seed)
    keep = set(result.kept_ids)
    write_jsonl(stage.file("kept.jsonl"), [t.to_dict() for t in train if t.id in keep])
    truncated = sum(cut.get(t.id, 0) for t in train)
    summary = {"enabled": True, **result.stats.as_dict(), "truncated_predictions": truncated}
    if truncated:
        log.warning("filter: %d of %d predictions were cut at filter.max_new_tokens=%d (scored 0)", truncated,
                    len(train) * f.num_samples, f.max_new_tokens)
    stage.finish(c, summary=summary, outputs=["kept.jsonl"])
    log.info("filter: %s", summary)
    return summary
