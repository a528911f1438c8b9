"""The jitted, sharded update step shared by GRPO and SFT, and its GRPO instance.

One `jax.jit` function per (model, loss, optimizer, mesh) with explicit in/out shardings and the train
state donated (XLA updates parameters and optimizer moments in place). Inside:

1. the batch [B, ...] is viewed as M micro-batches [M, B / M, ...] (row i goes to micro-batch i % M,
   so every micro-batch stays spread over the data x fsdp devices);
2. `lax.scan` over micro-batches: the frozen reference's log-probs (GRPO with kl_coef > 0, no
   gradient), then value-and-grad of numerator / denominator, where the denominator is computed from
   the masks of the *whole* batch, so the summed micro-batch gradients equal the full-batch gradient
   for every loss aggregation;
3. global-norm clipping and AdamW (`rwml_jax.rl.train_state`);
4. with `prompt_group_size` = G > 1 (GRPO groups sharing their prompt, `rwml_jax.rl.shared_prompt`)
   the batch is regrouped on the host into bp = B / G groups, each prompt runs through the model once
   per group, and micro-batches hold whole groups;
5. mixture-of-experts models: each micro-batch's router statistics (real tokens only) give the
   load-balancing loss of `rwml_jax.models.moe` (added with `router_aux_loss_coef`, 0 = off, the usual RL
   setting; with micro-batches, the mean of the micro-batches' losses) and the per-expert metrics;
6. a non-finite loss or gradient leaves parameters and optimizer state untouched (selected on
   device, no host sync) and sets `metrics["finite"] = 0`; `UpdateStep.__call__` then raises
   `NonFiniteLossError` naming the step, carrying the intact state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rwml_jax import platform
from rwml_jax import sharding as sh
from rwml_jax.models import decoder, moe
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl import grpo
from rwml_jax.rl.logprobs import completion_logprobs
from rwml_jax.rl.shared_prompt import flat_rows, group_batch
from rwml_jax.rl.train_state import TrainState, state_shardings

Batch = dict[str, Any]
# (logp [b, C], entropy [b, C] | None, micro-batch, ref_logp [b, C] | None) -> (numerator, metric sums)
LossTerms = Callable[[jax.Array, jax.Array | None, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]

BASE_KEYS = ("input_ids", "attention_mask", "completion_start", "completion_mask")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient of an update was NaN / Inf. `state` is the train state from before the
    failed update (still valid: the step left it untouched), `metrics` the step's metrics."""

    def __init__(self, step: int, metrics: Mapping[str, Any], state: TrainState):
        self.step, self.metrics, self.state = step, dict(metrics), state
        super().__init__(
            f"non-finite loss at update step {step}: loss={metrics.get('loss')}, "
            f"grad_norm={metrics.get('grad_norm')}; the update was not applied and training stops "
            "here so no broken parameters reach a checkpoint"
        )


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO loss options (see `rwml_jax.rl.grpo.policy_loss`) and step execution options.

    micro_batch_size: sequences per micro-batch over the whole mesh (None = the whole batch at once);
      must divide the batch and be a multiple of the data x fsdp device count.
    logits_chunk: completion positions per LM-head chunk (None = all at once; see rl.logprobs).
    with_entropy: report the policy's token entropy (one extra pass over the logits).
    prompt_group_size: G > 1 runs each group's prompt through the model once instead of G times
      (`rwml_jax.rl.shared_prompt`; same update up to float rounding). Batches must then be in the
      "split" layout with rows ordered group by group, the G rows of a group sharing one prompt (what
      GRPO sampling produces; checked on every call), and micro_batch_size a multiple of G.
      0 or 1: every row runs its own prompt.
    router_aux_loss_coef: weight of a mixture-of-experts model's load-balancing loss (0 = off).
    temperature: the rollouts' sampling temperature. The policy trained (its log-probs, the importance
      ratio, the KL to the reference and the entropy) is softmax(logits / temperature), the distribution
      the rollouts were drawn from, as verl's actor does; the sampler's `old_logp` must be taken at the
      same temperature (`rwml_jax.sampling.filters.token_logprobs`).
    """

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "token-mean"
    micro_batch_size: int | None = None
    logits_chunk: int | None = None
    with_entropy: bool = True
    prompt_group_size: int = 0
    router_aux_loss_coef: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}; the trained policy softmax(logits / T) needs T > 0")
        if self.loss_agg not in grpo.LOSS_AGGS:
            raise ValueError(f"loss_agg={self.loss_agg!r}; expected one of {grpo.LOSS_AGGS}")
        if self.kl_estimator not in grpo.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; expected one of {grpo.KL_ESTIMATORS}")
        if self.kl_coef < 0 or self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ValueError("kl_coef, clip_eps_low and clip_eps_high must be >= 0")
        if self.prompt_group_size < 0:
            raise ValueError(f"prompt_group_size={self.prompt_group_size}; expected >= 0")

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef != 0.0


@dataclasses.dataclass(frozen=True)
class Loss:
    """What an `UpdateStep` optimises: `terms` gives a micro-batch's loss numerator and metric sums,
    `denominator` the whole batch's normaliser (so micro-batch gradients add up to the full-batch one),
    `finalize` turns metric sums into metrics; plus the batch keys it needs and how it is computed
    (micro-batches, LM-head chunks, entropy, a frozen reference, shared group prompts: see `GRPOConfig`)."""

    terms: LossTerms
    denominator: Callable[[Batch], jax.Array]
    finalize: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]
    required_keys: tuple[str, ...]
    micro_batch_size: int | None = None
    logits_chunk: int | None = None
    with_entropy: bool = False
    uses_reference: bool = False
    prompt_group_size: int = 0
    router_aux_loss_coef: float = 0.0
    temperature: float = 1.0  # the policy is softmax(logits / temperature) (see GRPOConfig)


# ---------------------------------------------------------------------------------------------------
# Micro-batching helpers
# ---------------------------------------------------------------------------------------------------

def split_micro_batches(x: jax.Array, num_micro: int) -> jax.Array:
    """[B, ...] -> [M, B / M, ...] with row i in micro-batch i % M (keeps the batch-axis sharding)."""
    B = x.shape[0]
    return jnp.swapaxes(x.reshape(B // num_micro, num_micro, *x.shape[1:]), 0, 1)


def _combine(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: (jnp.maximum(a[k], b[k]) if k.startswith("max_") else a[k] + b[k]) for k in a}


def _num_micro(batch_size: int, micro_batch_size: int | None, mesh: Mesh, group: int = 1) -> int:
    """Micro-batches per step. With shared prompts (group = G > 1) the unit sharded over the data x fsdp
    devices and split into micro-batches is a group of G rows, not a row."""
    multiple = sh.batch_size_multiple(mesh)
    unit = "groups" if group > 1 else "rows"
    if batch_size % group:
        raise ValueError(f"batch size {batch_size} is not a whole number of prompt groups of {group}")
    if (batch_size // group) % multiple:
        raise ValueError(f"batch of {batch_size // group} {unit} is not a multiple of data x fsdp = {multiple} devices")
    if not micro_batch_size or micro_batch_size >= batch_size:
        return 1
    if batch_size % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} does not divide the batch size {batch_size}")
    if micro_batch_size % group:
        raise ValueError(f"micro_batch_size={micro_batch_size} is not a multiple of prompt_group_size={group}")
    if (micro_batch_size // group) % multiple:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} ({micro_batch_size // group} {unit}) is not a multiple of "
            f"data x fsdp = {multiple} devices"
        )
    return batch_size // micro_batch_size


# ---------------------------------------------------------------------------------------------------
# The generic step
# ---------------------------------------------------------------------------------------------------

class UpdateStep:
    """A compiled optimizer step: `state, metrics = step(state, batch[, ref_params])`.

    The state argument is donated (do not use it after the call). `batch` may hold NumPy arrays (the
    same global batch on every process; they are placed into their shardings) or global jax.Arrays
    (fully addressable ones when prompt_group_size > 1: the batch is regrouped on the host).
    Metrics are replicated float32 scalars (jax.Arrays; `float()` them when needed).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        loss: Loss,
        *,
        rules: Sequence[tuple[str, Any]] = sh.DEFAULT_RULES,
        learning_rate: Callable[[jax.Array], jax.Array] | None = None,
        check_finite: bool = True,
        execution: platform.ExecutionConfig | None = None,
    ):
        self.model_config = model_config
        self.execution = execution or platform.resolve(model_config, mesh.devices.flat)
        self.group = loss.prompt_group_size if loss.prompt_group_size > 1 else 1
        self.optimizer = optimizer
        self.mesh = mesh
        self.rules = tuple(rules)
        self.required_keys = tuple(loss.required_keys)
        self.micro_batch_size = loss.micro_batch_size
        self.uses_reference = loss.uses_reference
        self.check_finite = check_finite
        self.param_shardings = decoder.param_shardings(model_config, mesh, self.rules)
        self.state_shardings = state_shardings(optimizer, self.param_shardings, mesh)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(sh.batch_axes(mesh)))
        self._loss_terms = loss.terms
        self._denominator = loss.denominator
        self._finalize = loss.finalize
        self._logits_chunk = loss.logits_chunk
        self._with_entropy = loss.with_entropy
        self._lr = learning_rate
        self._aux_coef = loss.router_aux_loss_coef
        self._temperature = float(loss.temperature)
        if self._aux_coef < 0:
            raise ValueError(f"router_aux_loss_coef={self._aux_coef}; expected >= 0")
        # Fused q/k/v and gate/up matmuls concatenate weights; only without tensor parallelism.
        self._fuse = mesh.shape["tensor"] == 1
        replicated = NamedSharding(mesh, PartitionSpec())
        in_sh: tuple[Any, ...] = (self.state_shardings, self.batch_sharding)
        if loss.uses_reference:
            in_sh = in_sh + (self.param_shardings,)
        self._jitted = jax.jit(
            self._step, in_shardings=in_sh, out_shardings=(self.state_shardings, replicated), donate_argnums=(0,)
        )

    # -- traced -------------------------------------------------------------------------------------
    def _micro_grads(self, params: Any, ref_params: Any, mb: Batch, den: jax.Array, num_micro: int = 1):
        cfg = self.model_config
        rows = flat_rows(mb) if self.group > 1 else mb  # per-row entries [b, ...] for the loss
        ref_logp = rows.get("ref_logp")
        if ref_logp is None and ref_params is not None:
            ref_logp, _ = completion_logprobs(cfg, ref_params, mb, chunk=self._logits_chunk, fuse=self._fuse, gather=self._fuse,
                                              execution=self.execution, temperature=self._temperature)
            ref_logp = jax.lax.stop_gradient(ref_logp)

        def loss_fn(p):
            logp, ent, router = completion_logprobs(cfg, p, mb, chunk=self._logits_chunk, with_entropy=self._with_entropy,
                                                    fuse=self._fuse, gather=self._fuse, execution=self.execution,
                                                    with_router=True, temperature=self._temperature)
            num, sums = self._loss_terms(logp, ent, rows, ref_logp)
            loss = num / den
            if router is not None:
                aux = moe.load_balancing_loss(cfg, router)
                if self._aux_coef:
                    loss = loss + self._aux_coef * aux / num_micro
                sums = dict(sums, router_aux_loss=jax.lax.stop_gradient(aux) / num_micro,
                            expert_tokens=jax.lax.stop_gradient(router["counts"]))
            return loss, sums

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
        return loss, sums, grads

    def _step(self, state: TrainState, batch: Batch, ref_params: Any = None):
        with sh.tracing_context(self.mesh, self.rules):
            rows = flat_rows(batch) if self.group > 1 else batch
            B = rows["completion_mask"].shape[0]
            num_micro = _num_micro(B, self.micro_batch_size, self.mesh, self.group)
            den = self._denominator(rows)
            if num_micro == 1:
                loss, sums, grads = self._micro_grads(state.params, ref_params, batch, den)
            else:
                micro = num_micro
                micro_sharding = NamedSharding(self.mesh, PartitionSpec(None, sh.batch_axes(self.mesh)))
                mbs = jax.tree.map(
                    lambda x: jax.lax.with_sharding_constraint(split_micro_batches(x, num_micro), micro_sharding),
                    batch,
                )
                first = jax.tree.map(lambda x: x[0], mbs)
                _, sums_shape, _ = jax.eval_shape(lambda m: self._micro_grads(state.params, ref_params, m, den, micro),
                                                  first)
                zero_grads = jax.tree.map(
                    lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros(p.shape, jnp.float32), s),
                    state.params, self.param_shardings,
                )
                carry0 = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
                          zero_grads)

                def body(carry, mb):
                    loss_acc, sums_acc, grads_acc = carry
                    loss, sums, grads = self._micro_grads(state.params, ref_params, mb, den, micro)
                    grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
                    return (loss_acc + loss, _combine(sums_acc, sums), grads_acc), None

                (loss, sums, grads), _ = jax.lax.scan(body, carry0, mbs)
                grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

            grad_norm = optax.tree.norm(grads)
            updates, new_opt = self.optimizer.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

            def keep_if_bad(new, old):
                return jnp.where(ok, new, old) if hasattr(new, "dtype") else new

            new_state = TrainState(
                step=state.step + ok.astype(jnp.int32),
                params=jax.tree.map(keep_if_bad, new_params, state.params),
                opt_state=jax.tree.map(keep_if_bad, new_opt, state.opt_state),
            )
            router = {k: sums.pop(k) for k in ("router_aux_loss", "expert_tokens") if k in sums}
            metrics = dict(self._finalize(sums, den))
            if router:
                metrics.update(expert_metrics(router["expert_tokens"]), router_aux_loss=router["router_aux_loss"])
            metrics.update(
                loss=loss,
                grad_norm=grad_norm,
                finite=ok.astype(jnp.float32),
                step=state.step.astype(jnp.float32),
                seqs=jnp.asarray(B, jnp.float32),
            )
            if self._lr is not None:
                metrics["learning_rate"] = jnp.asarray(self._lr(state.step), jnp.float32)
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
            return new_state, metrics

    # -- host side ----------------------------------------------------------------------------------
    def prepare_batch(self, batch: Mapping[str, Any]) -> Batch:
        """Validate keys / shapes and place host arrays into the batch sharding."""
        missing = [k for k in self.required_keys if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
        B, T = np.shape(batch["input_ids"])
        C = np.shape(batch["completion_mask"])[1]
        for key, value in batch.items():
            shape = np.shape(value)
            if not shape or shape[0] != B:
                raise ValueError(f"batch[{key!r}] has shape {shape}; every entry needs the batch dimension {B} first")
        if C > T - 1:
            raise ValueError(f"completion length {C} does not fit sequences of length {T} after a prompt")
        _num_micro(B, self.micro_batch_size, self.mesh, self.group)
        if self.group > 1:
            batch = group_batch({k: np.asarray(v) for k, v in batch.items()}, self.group)
        out: Batch = {}
        for key, value in batch.items():
            if isinstance(value, jax.Array):
                out[key] = value
            else:
                out[key] = sh.shard_batch(np.asarray(value), self.mesh, self.batch_sharding)
        return out

    def __call__(self, state: TrainState, batch: Mapping[str, Any], ref_params: Any = None):
        if self.uses_reference and ref_params is None and "ref_logp" not in batch:
            raise ValueError("this step uses a KL penalty: pass ref_params (the frozen reference) or batch['ref_logp']")
        args: tuple[Any, ...] = (state, self.prepare_batch(batch))
        if self.uses_reference:
            args = args + (ref_params,)
        new_state, metrics = self._jitted(*args)
        if self.check_finite and not bool(np.asarray(metrics["finite"])):
            raise NonFiniteLossError(int(np.asarray(metrics["step"])), sh.to_host(metrics), new_state)
        return new_state, metrics

    def lower(self, state: Any, batch: Mapping[str, Any], ref_params: Any = None):
        """`jax.jit(...).lower` on (abstract) arguments, e.g. to inspect or pre-compile the step (with
        prompt_group_size > 1 the batch in its grouped form, `rl.shared_prompt`)."""
        args: tuple[Any, ...] = (state, batch)
        if self.uses_reference:
            args = args + (ref_params,)
        return self._jitted.lower(*args)


def expert_metrics(counts: jax.Array) -> dict[str, jax.Array]:
    """Metrics of a mixture-of-experts model's routing from the (token, expert) assignments per expert
    counts [X], summed over the sparse layers and the batch's real tokens: `expert_tokens/NNN` per expert,
    and `expert_load_max` / `expert_load_min`, the busiest and idlest expert's share relative to an even
    split (1 = balanced)."""
    mean = jnp.maximum(jnp.mean(counts), 1e-9)
    out = {f"expert_tokens/{i:03d}": counts[i] for i in range(counts.shape[0])}
    out.update(expert_load_max=jnp.max(counts) / mean, expert_load_min=jnp.min(counts) / mean)
    return out


# ---------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------

def grpo_loss_terms(cfg: GRPOConfig) -> LossTerms:
    def terms(logp, entropy, mb, ref_logp):
        old = mb.get("old_logp")
        if old is None:  # strictly on-policy: ratio 1, gradient of the plain policy gradient
            old = jax.lax.stop_gradient(logp)
        return grpo.policy_loss_terms(
            logp, old, ref_logp, mb["advantages"], mb["completion_mask"],
            clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator, loss_agg=cfg.loss_agg, entropy=entropy,
        )

    return terms


def make_grpo_step(model_config: ModelConfig, grpo_config: GRPOConfig, optimizer: optax.GradientTransformation,
                   mesh: Mesh, **step_options: Any) -> UpdateStep:
    """The GRPO update: `state, metrics = step(state, batch, ref_params)` (ref_params only when
    kl_coef > 0; a batch may instead carry precomputed `ref_logp` [B, C]). step_options: `UpdateStep`'s
    (rules, learning_rate, check_finite, execution).

    batch: the arrays of `rwml_jax.rl.batch` plus `advantages` [B] and optionally `old_logp` [B, C].
    Metrics: loss, pg_loss, kl_loss, ref_kl, clip_frac(_low/_high), sampler_kl(_k1), ratio_mean,
    max_ratio, entropy, grad_norm, learning_rate (when given), tokens, seqs, step, finite; for a
    mixture-of-experts model also router_aux_loss and `expert_metrics`.
    """
    loss = Loss(
        terms=grpo_loss_terms(grpo_config),
        denominator=lambda b: grpo.loss_denominator(b["completion_mask"], grpo_config.loss_agg),
        finalize=grpo.finalize_metrics,
        required_keys=BASE_KEYS + ("advantages",),
        micro_batch_size=grpo_config.micro_batch_size,
        logits_chunk=grpo_config.logits_chunk,
        with_entropy=grpo_config.with_entropy,
        uses_reference=grpo_config.uses_reference,
        prompt_group_size=grpo_config.prompt_group_size,
        router_aux_loss_coef=grpo_config.router_aux_loss_coef,
        temperature=grpo_config.temperature,
    )
    return UpdateStep(model_config, optimizer, mesh, loss, **step_options)


def make_logprob_fn(
    model_config: ModelConfig,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Any]] = sh.DEFAULT_RULES,
    logits_chunk: int | None = None,
    execution: platform.ExecutionConfig | None = None,
    temperature: float = 1.0,
) -> Callable[[Any, Batch], jax.Array]:
    """A jitted `fn(params, batch) -> logp [B, C]` of softmax(logits / temperature) (e.g. reference
    log-probs for several epochs over one batch, or sampler-free `old_logp`). The batch is placed like
    the update's."""
    param_sh = decoder.param_shardings(model_config, mesh, rules)
    execution = execution or platform.resolve(model_config, mesh.devices.flat)
    batch_sh = NamedSharding(mesh, PartitionSpec(sh.batch_axes(mesh)))

    def fn(params, batch):
        with sh.tracing_context(mesh, rules):
            single = mesh.shape["tensor"] == 1
            logp, _ = completion_logprobs(model_config, params, batch, chunk=logits_chunk, fuse=single, gather=single,
                                          execution=execution, temperature=temperature)
            return logp

    jitted = jax.jit(fn, in_shardings=(param_sh, batch_sh), out_shardings=batch_sh)

    def call(params: Any, batch: Mapping[str, Any]) -> jax.Array:
        placed = {k: v if isinstance(v, jax.Array) else sh.shard_batch(np.asarray(v), mesh, batch_sh)
                  for k, v in batch.items() if k in BASE_KEYS}
        return jitted(params, placed)

    return call
