"""The sampler's decode weight format: per-layer weights, q/k/v and gate/up fused, stored in the orientation
(and multiplied by the kind of product) that the machine streams fastest.

A decode step multiplies B (~16-256) rows by every weight matrix, so it streams the weights from memory once
per generated token, and one product over a fused q/k/v (or gate/up) weight beats three (or two). Which
orientation streams fastest depends on the machine and the model's size (`rwml_jax.platform.default_weight_format`);
each is a `Linear` that knows how to store a weight and multiply by it:
- `OutIn` ("out_in", keys `*_t`): [out, in], contracted on its last axis (the `torch.nn.Linear` orientation;
  the choice off the CPU);
- `InOut` ("in_out", keys `*_w`): [in, out], a plain matmul;
- `OutInReduce` ("out_in_reduce", keys `*_r`): [out, in]; products of at most `platform.REDUCE_MAX_ROWS` rows
  as `platform.multiply_and_sum` (no weight packing), larger ones (a prefill) as a dot_general.

Per-layer tree (E hidden, H / K query / kv heads, D head_dim, F SwiGLU width), shown for "out_in":
    input_norm [E], post_attention_norm [E], q_norm [D], k_norm [D] (qk-norm models only)
    fused:   qkv_t [(H + 2K) * D, E], gate_up_t [2F, E]          (when the mesh's tensor axis is 1)
    unfused: q_t [H * D, E], k_t / v_t [K * D, E], gate_t / up_t [F, E]
    o_t [E, H * D], down_t [E, F]
    biases where the model has them: qkv_bias (or q_bias, k_bias, v_bias), o_bias, gate_up_bias (or
    gate_bias, up_bias), down_bias
Sparse layers of a mixture-of-experts model have no gate/up/down (nor their biases) but `moe`, the model's
{router [E, X], gate_kernel / up_kernel [X, E, Fm], down_kernel [X, Fm, E]} as they are (the grouped
matmul of `rwml_jax.models.moe` reads them in this layout in every orientation).
The top level keeps `embed`, `final_norm` and `lm_head` as the model has them; "in_out" with a tied head adds
`lm_head_w` [E, V] (a transposed copy of the embedding); "out_in_reduce" stores an untied head as
`lm_head_r` [V, E] and multiplies a tied one by the [V, E] embedding itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rwml_jax import platform
from rwml_jax.models import decoder, moe
from rwml_jax.models.block import ParamWeights, split_widths
from rwml_jax.models.config import ModelConfig

Params = Any
FORMATS = platform.WEIGHT_FORMATS[1:]  # ("out_in", "in_out", "out_in_reduce")


class OutIn:
    """Weights [out, in], contracted on their last axis."""

    suffix = "_t"

    def store(self, w: jax.Array) -> jax.Array:
        """A weight [out, in] as this format stores it."""
        return w

    def store_spec(self, spec: P) -> P:
        """The PartitionSpec of a weight whose [out, in] form has `spec`, as stored."""
        return spec

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())))


class InOut(OutIn):
    """Weights [in, out], a plain matmul."""

    suffix = "_w"

    def store(self, w: jax.Array) -> jax.Array:
        return w.T

    def store_spec(self, spec: P) -> P:
        return P(*reversed(tuple(spec)))

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.matmul(x, w.astype(x.dtype))


class OutInReduce(OutIn):
    """Weights [out, in]; skinny products as a multiply-and-sum (float32), others as a dot_general."""

    suffix = "_r"

    def __call__(self, x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
        out_dtype = out_dtype or x.dtype
        if x.shape[0] <= platform.REDUCE_MAX_ROWS:
            return platform.multiply_and_sum(x, w).astype(out_dtype)
        return jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)


_LINEARS = {"out_in": OutIn, "in_out": InOut, "out_in_reduce": OutInReduce}


def _bias(y: jax.Array, b: jax.Array | None) -> jax.Array:
    return y if b is None else y + b.astype(y.dtype)


class DecodeWeights:
    """One decode weight format (module docstring) for a model: converts the model's stacked parameters
    (`convert`, jit it with `logical_axes` as output shardings) and multiplies by them in
    `rwml_jax.models.block.block` (the weight-format methods norm / qkv / out / gate_up / down / lm_logits).

    orientation: one of `FORMATS`; fuse: concatenate q/k/v and gate/up (use it when the mesh's tensor axis is
    1: fusing head-sharded weights would mix shards).
    """

    def __init__(self, config: ModelConfig, orientation: str, *, fuse: bool):
        if orientation not in FORMATS:
            raise ValueError(f"weight orientation {orientation!r}; expected one of {FORMATS}")
        self.config, self.orientation, self.fuse = config, orientation, fuse
        self.linear = _LINEARS[orientation]()
        self._s = self.linear.suffix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecodeWeights) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (DecodeWeights, self.config, self.orientation, self.fuse)

    # -------------------------------------------------------------------------------- layout
    def _layer(self, lp: Any, out_in: Any, bias: Any, store: Any, experts: Any = None) -> Params:
        """One layer in this format from callables: `lp(norm name)`, `out_in(*names)` (the [out, in]
        weights of `names` concatenated, or their spec), `bias(*names)`, and `store` (the linear's
        `store` or `store_spec`); experts: a sparse layer's `moe` subtree (or its specs), None when dense."""
        c = self.config
        out = {"input_norm": lp("input_norm"), "post_attention_norm": lp("post_attention_norm")}
        if c.qk_norm:
            out["q_norm"], out["k_norm"] = lp("q_norm"), lp("k_norm")
        groups = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
        if experts is not None:
            del groups["gate_up"]
            out["moe"] = experts
        has_bias = {"qkv": c.qkv_bias, "gate_up": c.mlp_bias}
        for fused, names in groups.items():
            if self.fuse:
                out[fused + self._s] = store(out_in(*names))
                if has_bias[fused]:
                    out[f"{fused}_bias"] = bias(*names)
            else:
                for n in names:
                    out[n + self._s] = store(out_in(n))
                    if has_bias[fused]:
                        out[f"{n}_bias"] = bias(n)
        out["o" + self._s] = store(out_in("o"))
        if c.o_bias:
            out["o_bias"] = bias("o")
        if experts is None:
            out["down" + self._s] = store(out_in("down"))
            if c.mlp_bias:
                out["down_bias"] = bias("down")
        return out

    def convert(self, params: Params) -> Params:
        """Stacked model parameters -> this format (one copy of the layer weights)."""
        c = self.config
        E, H, D = c.hidden_size, c.num_attention_heads, c.head_dim
        per = decoder.unstack_layers(params, c)

        def layer(lp):
            a, m = lp["attn"], lp.get("mlp", {})
            weights = {"q": a["q_kernel"].reshape(E, -1).T, "k": a["k_kernel"].reshape(E, -1).T,
                       "v": a["v_kernel"].reshape(E, -1).T, "o": a["o_kernel"].reshape(H * D, E).T}
            weights.update({n: m[f"{n}_kernel"].T for n in ("gate", "up", "down") if f"{n}_kernel" in m})
            biases = {n: a[f"{n}_bias"].reshape(-1) for n in ("q", "k", "v", "o") if f"{n}_bias" in a}
            biases.update({n: m[f"{n}_bias"] for n in ("gate", "up", "down") if f"{n}_bias" in m})
            norms = {"input_norm": lp["input_norm"]["scale"], "post_attention_norm": lp["post_attention_norm"]["scale"]}
            if c.qk_norm:
                norms.update(q_norm=a["q_norm"]["scale"], k_norm=a["k_norm"]["scale"])
            return self._layer(norms.__getitem__, lambda *ns: jnp.concatenate([weights[n] for n in ns], axis=0),
                               lambda *ns: jnp.concatenate([biases[n] for n in ns]), self.linear.store, lp.get("moe"))

        out = dict(per, layers=tuple(layer(lp) for lp in per["layers"]))
        return self._head(out, params, lambda w: w.T)

    def logical_axes(self) -> Params:
        """PartitionSpecs of logical axis names for `convert`'s output (fused weights keep their output
        axis unsharded)."""
        c = self.config
        out_axis = {"q": "q_heads", "k": "kv_heads", "v": "kv_heads", "gate": "mlp", "up": "mlp"}
        specs = {n: P(out_axis[n], "embed") for n in out_axis}
        specs.update(o=P("embed", "q_heads"), down=P("embed", "mlp"))
        norms = {"input_norm": P("norm"), "post_attention_norm": P("norm"), "q_norm": P("head_dim"), "k_norm": P("head_dim")}
        bias_axes = {n: P(out_axis[n]) for n in out_axis}
        bias_axes.update(o=P("embed"), down=P("embed"))
        experts = {"router": P(*moe.ROUTER_AXES), "gate_kernel": P(*moe.GATE_UP_AXES),
                   "up_kernel": P(*moe.GATE_UP_AXES), "down_kernel": P(*moe.DOWN_AXES)}

        def one(sparse):
            return self._layer(norms.__getitem__, lambda *ns: specs[ns[0]] if len(ns) == 1 else P(None, "embed"),
                               lambda *ns: bias_axes[ns[0]] if len(ns) == 1 else P(None), self.linear.store_spec,
                               dict(experts) if sparse else None)

        top = {k: v for k, v in decoder.param_logical_axes(c).items() if k != "layers"}
        top["layers"] = tuple(one(sparse) for sparse in c.sparse_layers)
        return self._head(top, decoder.param_logical_axes(c), lambda spec: P(*reversed(tuple(spec))))

    def _head(self, out: Params, stacked: Params, transpose: Any) -> Params:
        tied = self.config.tie_word_embeddings
        if self.orientation == "in_out" and tied:
            out["lm_head_w"] = transpose(stacked["embed"])
        if self.orientation == "out_in_reduce" and not tied:
            out["lm_head_r"] = transpose(out.pop("lm_head"))
        return out

    # ------------------------------------------------------------------------ weight-format methods
    def norm(self, lp: Params, name: str) -> jax.Array:
        return lp[name]

    def _fused(self, lp: Params, fused: str, names: tuple[str, ...], widths: list[int], h: jax.Array) -> list[jax.Array]:
        if fused + self._s not in lp:
            return [self._one(lp, n, h) for n in names]
        return split_widths(self._one(lp, fused, h), widths)

    def _one(self, lp: Params, name: str, x: jax.Array) -> jax.Array:
        return _bias(self.linear(x, lp[name + self._s]), lp.get(f"{name}_bias"))

    def qkv(self, lp: Params, h: jax.Array) -> list[jax.Array]:
        c = self.config
        H, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        return self._fused(lp, "qkv", ("q", "k", "v"), [H * D, K * D, K * D], h)

    def gate_up(self, lp: Params, h: jax.Array) -> list[jax.Array]:
        F = self.config.intermediate_size
        return self._fused(lp, "gate_up", ("gate", "up"), [F, F], h)

    def out(self, lp: Params, o: jax.Array) -> jax.Array:
        return self._one(lp, "o", o)

    def down(self, lp: Params, a: jax.Array) -> jax.Array:
        return self._one(lp, "down", a)

    sparse = ParamWeights.sparse  # the experts keep the model's layout
    moe = ParamWeights.moe

    def lm_logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        """Final-norm hidden [..., E] -> float32 logits [..., V] through this format's head."""
        cdt = jnp.dtype(self.config.compute_dtype)
        h = hidden.astype(cdt)
        if "lm_head_w" in params:
            return jnp.matmul(h, params["lm_head_w"].astype(cdt), preferred_element_type=jnp.float32)
        if self.orientation == "out_in_reduce":
            w = params["embed"] if self.config.tie_word_embeddings else params["lm_head_r"]
            rows = h.reshape(-1, h.shape[-1])
            return self.linear(rows, w, jnp.float32).reshape(*h.shape[:-1], w.shape[0])
        w = params["embed"].T if self.config.tie_word_embeddings else params["lm_head"]
        return jnp.matmul(h, w.astype(cdt), preferred_element_type=jnp.float32)
