"""The decoder-only LLM (Qwen2 / Qwen3 / Llama 3 / Qwen3-MoE) as pure functions over a parameter pytree.

    params = init_params(config, rng)                       # or models.load_pretrained(path)
    logits, cache = apply(config, params, input_ids, attention_mask, cache=cache)

One forward for everything: `hidden_states` embeds the tokens, runs `rwml_jax.models.block.block` over the
layers and applies the final norm. What differs between training, a cache-less forward, the sampler's
prefill and its decode steps is the attention strategy (`rwml_jax.models.attention`), the weight format
(`block.ParamWeights` or the sampler's) and the execution config (`rwml_jax.platform`: layer loop, remat).

Parameters (logical axis names in brackets; `param_logical_axes` gives them as PartitionSpecs):
    embed [V, E] (vocab, embed)
    layers (stacked: every leaf has a leading L axis, logical name "layers"):
        attn: q_kernel [E, H, D] (embed, q_heads, head_dim), k_kernel / v_kernel [E, K, D] (embed, kv_heads,
              head_dim), o_kernel [H, D, E] (q_heads, head_dim, embed); q_bias [H, D], k_bias / v_bias [K, D]
              (qkv_bias models), o_bias [E] (o_bias models); q_norm / k_norm: {scale [D] (head_dim)} (Qwen3)
        mlp: gate_kernel / up_kernel [E, F] (embed, mlp), down_kernel [F, E] (mlp, embed); biases (mlp_bias)
        moe (mixture-of-experts models): router [E, X] (embed, -), gate_kernel / up_kernel [X, E, Fm]
             (experts, expert_embed, expert_mlp), down_kernel [X, Fm, E] (experts, expert_mlp, expert_embed)
        input_norm, post_attention_norm: {scale [E] (norm)}
    In a mixture-of-experts model `mlp` is stacked over the dense layers only and `moe` over the sparse ones
    (`ModelConfig.sparse_layers`; Qwen3-30B-A3B has no dense layer, so no `mlp`); attn and the norms over all.
    final_norm: {scale [E] (norm)}
    lm_head [E, V] (embed, vocab) unless the embeddings are tied
Kernels are initialised normal(0.02), norm scales to one, biases to zero. `unstack_layers` turns the stacked
`layers` into a tuple of per-layer trees; the forward then runs the layers as straight-line code (a decode
loop does not slice weights out of stacked arrays on every step).

KV cache (for the sampler), a dict:
    k:     [L, B, K, D, S] cached keys, transposed; per-layer form: a tuple of L arrays [B, K, D, S]
    v:     [L, B, K, S, D] cached values; per-layer form: L arrays [B, K, S, D]
    mask:  [B, S] bool     which slots hold a real (non-pad) token
    pos:   [B] int32       RoPE position the next real token of each row gets
    index: [] int32        the first free slot (all rows advance together)
Shared prefix (GRPO groups, one-token decode steps, per-layer cache): rows b * n .. b * n + n - 1 continue
the same prompt, whose keys and values sit once in a prefix dict k: L arrays [Bp, K, D, P], v: L arrays
[Bp, K, P, D], mask [Bp, P] (B = Bp * n); the cache holds only each row's own tokens.

Shapes: B batch, T new tokens, S cache slots, E hidden, H / K query / kv heads, D head_dim, F SwiGLU width,
V vocabulary, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from rwml_jax import platform
from rwml_jax import sharding as sh
from rwml_jax.models import attention, moe
from rwml_jax.models.block import ParamWeights, block, constrain, rms_norm
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.rope import rope_tables

Params = Any  # nested dict of jax.Array
Cache = dict[str, Any]

_INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------

def _specs(c: ModelConfig) -> Params:
    """The parameter tree with (shape, logical axes, init) leaves; layer leaves already stacked."""
    E, H, K, D, F, V, L = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                           c.intermediate_size, c.vocab_size, c.num_hidden_layers)

    def norm(n, axis):
        return {"scale": ((n,), (axis,), "ones")}

    attn = {"q_kernel": ((E, H, D), ("embed", "q_heads", "head_dim"), "normal"),
            "k_kernel": ((E, K, D), ("embed", "kv_heads", "head_dim"), "normal"),
            "v_kernel": ((E, K, D), ("embed", "kv_heads", "head_dim"), "normal"),
            "o_kernel": ((H, D, E), ("q_heads", "head_dim", "embed"), "normal")}
    if c.qkv_bias:
        attn["q_bias"] = ((H, D), ("q_heads", "head_dim"), "zeros")
        attn["k_bias"] = attn["v_bias"] = ((K, D), ("kv_heads", "head_dim"), "zeros")
    if c.o_bias:
        attn["o_bias"] = ((E,), ("embed",), "zeros")
    if c.qk_norm:
        attn["q_norm"] = attn["k_norm"] = norm(D, "head_dim")
    mlp = {"gate_kernel": ((E, F), ("embed", "mlp"), "normal"), "up_kernel": ((E, F), ("embed", "mlp"), "normal"),
           "down_kernel": ((F, E), ("mlp", "embed"), "normal")}
    if c.mlp_bias:
        mlp.update(gate_bias=((F,), ("mlp",), "zeros"), up_bias=((F,), ("mlp",), "zeros"),
                   down_bias=((E,), ("embed",), "zeros"))
    X, Fm = c.num_experts, c.moe_intermediate_size
    experts = {"router": ((E, X), moe.ROUTER_AXES, "normal"), "gate_kernel": ((X, E, Fm), moe.GATE_UP_AXES, "normal"),
               "up_kernel": ((X, E, Fm), moe.GATE_UP_AXES, "normal"),
               "down_kernel": ((X, Fm, E), moe.DOWN_AXES, "normal")}
    n_sparse = sum(c.sparse_layers)

    def stack(tree, n):
        return jax.tree.map(lambda s: ((n, *s[0]), ("layers", *s[1]), s[2]), tree, is_leaf=_is_spec)

    stacked = stack({"attn": attn, "input_norm": norm(E, "norm"), "post_attention_norm": norm(E, "norm")}, L)
    if L - n_sparse:
        stacked["mlp"] = stack(mlp, L - n_sparse)
    if n_sparse:
        stacked["moe"] = stack(experts, n_sparse)
    out = {"embed": ((V, E), ("vocab", "embed"), "normal"), "layers": stacked, "final_norm": norm(E, "norm")}
    if not c.tie_word_embeddings:
        out["lm_head"] = ((E, V), ("embed", "vocab"), "normal")
    return out


def _is_spec(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], str)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms, zero biases) in `param_dtype`."""
    specs = _specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    dtype = jnp.dtype(config.param_dtype)
    keys = jax.random.split(rng, len(leaves))

    def make(key, spec):
        shape, _, kind = spec
        if kind == "normal":
            return (_INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)

    return jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys, leaves)])


def param_logical_axes(config: ModelConfig) -> Params:
    """Pytree matching `params` whose leaves are `PartitionSpec`s of logical axis names."""
    return jax.tree.map(lambda s: PartitionSpec(*s[1]), _specs(config), is_leaf=_is_spec)


def param_shapes(config: ModelConfig) -> Params:
    """Pytree of `jax.ShapeDtypeStruct` for the parameters, without allocating them."""
    dtype = jnp.dtype(config.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], dtype), _specs(config), is_leaf=_is_spec)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Sequence[tuple[str, Any]] = sh.DEFAULT_RULES) -> Params:
    """NamedShardings of the parameters on `mesh` under the logical-axis `rules`."""
    if config.num_experts:
        target = dict(rules).get("experts")
        names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        ways = int(np.prod([mesh.shape[a] for a in names if a in mesh.shape]))
        if config.num_experts % ways:
            raise ValueError(f"{config.num_experts} experts cannot be split evenly over the mesh's "
                             f"{' x '.join(names)} axis of size {ways}")
    return sh.logical_to_sharding(param_logical_axes(config), mesh, rules)


def init_params_sharded(config: ModelConfig, rng: jax.Array, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = sh.DEFAULT_RULES) -> Params:
    """Random parameters created on the mesh: each device computes only its own shards."""
    return jax.jit(lambda r: init_params(config, r), out_shardings=param_shardings(config, mesh, rules))(rng)


def unstack_layers(params: Params, config: ModelConfig | None = None) -> Params:
    """`params` with the stacked `layers` subtree split into a tuple of L per-layer subtrees (one copy of
    the layer weights under jit); each has `mlp` or, in the sparse layers of a mixture-of-experts model,
    `moe`. config: needed only for a model with both dense and sparse layers (their order)."""
    if isinstance(params["layers"], (tuple, list)):
        return params
    layers = params["layers"]
    kinds = [k for k in ("mlp", "moe") if k in layers]
    common = {k: v for k, v in layers.items() if k not in kinds}
    n = jax.tree.leaves(common)[0].shape[0]
    if len(kinds) == 2 and config is None:
        raise ValueError("unstack_layers: a model with dense and sparse layers needs its config")
    sparse = config.sparse_layers if config is not None else (kinds == ["moe"],) * n
    seen = {True: 0, False: 0}
    out = []
    for i in range(n):
        kind, j = ("moe" if sparse[i] else "mlp"), seen[sparse[i]]
        seen[sparse[i]] += 1
        take = {kind: jax.tree.map(lambda a, j=j: a[j], layers[kind])}
        out.append(dict(jax.tree.map(lambda a, i=i: a[i], common), **take))
    return dict(params, layers=tuple(out))


def _per_layer(params: Params) -> bool:
    return isinstance(params["layers"], (tuple, list))


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------

def positions_from_mask(attention_mask: jax.Array, start: jax.Array | None = None) -> jax.Array:
    """RoPE positions [B, T] int32 that skip padding: the n-th real token of a row gets start + n."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return jnp.maximum(pos, 0)


def run_layers(c: ModelConfig, weights: Any, layers: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
               attend: attention.Attend, kv: Any, execution: platform.ExecutionConfig,
               token_mask: jax.Array | None = None) -> tuple[jax.Array, Any, Any]:
    """Every block over the residual stream x [B * T, E]. layers: stacked (a `lax.scan` per run of layers
    of one kind, `ModelConfig.layer_runs`; unrolled when `execution.unroll_layers`) or a tuple of per-layer
    trees (straight-line code); kv: the layers' cache states in the same form (stacked arrays, or a tuple
    of per-layer states), or None; token_mask [B * T]: the tokens the router statistics count.
    Returns (x, kv, the router statistics summed over the sparse layers, or None for a dense model)."""
    def body(x, layer):
        lp, kv_l = layer
        x, kv_l, stats = block(c, weights, lp, x, cos, sin, attend, kv_l, token_mask)
        return x, (kv_l, stats)

    if execution.remat != "none":
        policy = None if execution.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    total = None

    def add(stats):
        nonlocal total
        if stats is not None:
            total = stats if total is None else jax.tree.map(jnp.add, total, stats)

    if isinstance(layers, (tuple, list)):
        new_kv = []
        for i, lp in enumerate(layers):
            x, (kv_l, stats) = body(x, (lp, None if kv is None else kv[i]))
            new_kv.append(kv_l)
            add(stats)
        return x, (None if kv is None else tuple(new_kv)), total
    kinds = [k for k in ("mlp", "moe") if k in layers]
    common = {k: v for k, v in layers.items() if k not in kinds}
    runs = c.layer_runs
    kv_parts = []

    def part(tree, start, n):
        return tree if len(runs) == 1 else jax.tree.map(lambda a: a[start:start + n], tree)

    for sparse, start, n, kind_start in runs:
        kind = "moe" if sparse else "mlp"
        lp = dict(part(common, start, n), **{kind: part(layers[kind], kind_start, n)})
        x, (kv_run, stats) = jax.lax.scan(body, x, (lp, None if kv is None else part(kv, start, n)),
                                          unroll=execution.unroll_layers)
        kv_parts.append(kv_run)
        add(None if stats is None else jax.tree.map(lambda s: jnp.sum(s, axis=0), stats))
    if kv is not None and len(runs) > 1:
        kv = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kv_parts)
    elif kv is not None:
        kv = kv_parts[0]
    return x, kv, total


def hidden_states(c: ModelConfig, params: Params, input_ids: jax.Array, positions: jax.Array,
                  attend: attention.Attend, kv: Any = None, *, weights: Any = None,
                  execution: platform.ExecutionConfig | None = None, token_mask: jax.Array | None = None,
                  with_router: bool = False) -> tuple[jax.Array, Any]:
    """Embed input_ids [B, T], run the blocks with RoPE at `positions` [B, T] and the attention strategy
    `attend`, apply the final norm. weights: the layers' weight format (default `ParamWeights` unfused);
    execution: default `platform.default_execution(c)`; token_mask [B, T]: the tokens counted in the router
    statistics (default all). Returns (hidden [B, T, E] in the compute dtype, the layers' updated cache
    states), and with `with_router` also the router statistics summed over the sparse layers
    (`rwml_jax.models.moe.moe_mlp`; None for a dense model)."""
    B, T = input_ids.shape
    weights = weights if weights is not None else ParamWeights(c, fuse=False)
    execution = execution if execution is not None else platform.default_execution(c)
    x = jnp.take(params["embed"], input_ids, axis=0).astype(jnp.dtype(c.compute_dtype))
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed")).reshape(B * T, -1)
    cos, sin = rope_tables(c, positions)
    mask = None if token_mask is None else token_mask.reshape(B * T)
    x, kv, stats = run_layers(c, weights, params["layers"], x, cos, sin, attend, kv, execution, mask)
    hidden = rms_norm(x, params["final_norm"]["scale"], c.rms_norm_eps).reshape(B, T, -1)
    return (hidden, kv, stats) if with_router else (hidden, kv)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str | jnp.dtype | None = None, *,
               per_layer: bool = False) -> Cache:
    """An empty KV cache with `max_len` slots per row (module docstring); per_layer: k / v as tuples of L
    arrays (for per-layer params) instead of one stacked array each."""
    dtype = jnp.dtype(dtype or config.compute_dtype)
    L, K, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if per_layer:
        k = tuple(jnp.zeros((batch, K, D, max_len), dtype) for _ in range(L))
        v = tuple(jnp.zeros((batch, K, max_len, D), dtype) for _ in range(L))
    else:
        k = jnp.zeros((L, batch, K, D, max_len), dtype)
        v = jnp.zeros((L, batch, K, max_len, D), dtype)
    return dict(k=k, v=v, mask=jnp.zeros((batch, max_len), bool), pos=jnp.zeros((batch,), jnp.int32),
                index=jnp.zeros((), jnp.int32))


def apply(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    cache: Cache | None = None,
    return_hidden: bool = False,
    prefix: Cache | None = None,
    weights: Any = None,
    execution: platform.ExecutionConfig | None = None,
    with_router: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Run the decoder on `input_ids` [B, T].

    attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right). Defaults to all ones.
    positions: [B, T] RoPE positions; by default the count of real tokens before each one (plus the
      cache's `pos` when a cache is given), so left-padded rows start at position 0.
    cache: a KV cache from `init_cache` (stacked for stacked params, per-layer for per-layer params);
      the new tokens go to slots [index, index + T). Without one, causal attention over the batch.
    prefix: a shared prefix (module docstring) for one-token decode steps with a per-layer cache.
    weights, execution: see `hidden_states`.
    Returns (logits [B, T, V] float32, or final-norm hidden [B, T, E] when `return_hidden`; the updated
    cache or None), and with `with_router` the router statistics of the real tokens (`hidden_states`).
    """
    B, T = input_ids.shape
    mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        if prefix is not None:
            raise ValueError("a shared prefix is for one-token decode steps with a per-layer cache")
        pos = positions if positions is not None else positions_from_mask(mask)
        execution = execution if execution is not None else platform.default_execution(config)
        hidden, _, stats = hidden_states(config, params, input_ids, pos, attention.causal(mask, execution.attention),
                                         weights=weights, execution=execution, token_mask=mask, with_router=True)
        new_cache = None
    else:
        per_layer = isinstance(cache["k"], (tuple, list))
        if per_layer != _per_layer(params):
            raise ValueError(
                "params and cache disagree on the layer layout: per-layer params (unstack_layers) need "
                "init_cache(..., per_layer=True), stacked params need a stacked cache")
        if prefix is not None and (T != 1 or not per_layer):
            raise ValueError("a shared prefix is for one-token decode steps with a per-layer cache")
        index = cache["index"]
        pos = positions if positions is not None else positions_from_mask(mask, cache["pos"])
        kv_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (jnp.zeros((), jnp.int32), index))
        allowed = (jnp.arange(kv_mask.shape[1])[None, :] <= (index + jnp.arange(T))[:, None])[None] & kv_mask[:, None, :]
        if per_layer:
            extra = [()] * len(cache["k"]) if prefix is None else list(zip(prefix["k"], prefix["v"]))
            kv = tuple((k, v, *e) for k, v, e in zip(cache["k"], cache["v"], extra))
        else:
            kv = (cache["k"], cache["v"])
        attend = attention.cached(allowed, index, None if prefix is None else prefix["mask"])
        hidden, kv, stats = hidden_states(config, params, input_ids, pos, attend, kv, weights=weights,
                                          execution=execution, token_mask=mask, with_router=True)
        k, v = (tuple(s[0] for s in kv), tuple(s[1] for s in kv)) if per_layer else kv
        new_cache = dict(k=k, v=v, mask=kv_mask, pos=cache["pos"] + mask.sum(-1, dtype=jnp.int32), index=index + T)
    out = hidden if return_hidden else lm_logits(config, params, hidden, weights)
    return (out, new_cache, stats) if with_router else (out, new_cache)


def lm_logits(config: ModelConfig, params: Params, hidden: jax.Array, weights: Any = None) -> jax.Array:
    """Final-norm hidden states [..., E] -> float32 logits [..., V] through the weight format's head."""
    return (weights if weights is not None else ParamWeights(config)).lm_logits(params, hidden)


def forward(config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (float32) for a right- or left-padded batch; see `apply`."""
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return apply(config, params, jnp.asarray(input_ids), mask)[0]
