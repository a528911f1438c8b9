"""A mixture-of-experts training pass: ours against `transformers`' `Qwen3MoeForCausalLM`, in the same run.

Workload: a tiny Qwen3-MoE (the `tiny` benchmark shape of docs/benchmarks.md with every MLP replaced by 16
experts of width 176, top-4, renormalised: the active MLP width 4 x 176 = 704 equals `tiny`'s dense one),
random (seeded) weights shared by both sides (saved by us, loaded by transformers), a batch of `--batch`
random sequences of `--seq-len` tokens; one forward and backward of the mean next-token cross-entropy with
respect to every parameter. Ours: the training forward (`rwml_jax.rl.logprobs.completion_logprobs`, dropless
grouped-matmul experts) under `jax.value_and_grad`, jitted; peer: `model(input_ids, labels=input_ids).loss`
then `loss.backward()`, float32 on both sides, the peer with its default experts implementation and its
best of 1 and `--threads` threads. Both losses are printed (they agree to float rounding).

Figures: median seconds per forward + backward over `--repeats` interleaved calls after a warm-up (ours
compiles in it; the compile time is reported separately), tokens/s, and the ratio peer time / ours.

    python -m rwml_jax.bench.moe_bench
    python -m rwml_jax.bench.moe_bench --batch 4 --seq-len 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

from rwml_jax.bench.generate_bench import SHAPES
from rwml_jax.platform import reexec_with_malloc_tunables

MOE = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=176, norm_topk_prob=True)


def moe_config(shape: str = "tiny"):
    from rwml_jax.models.config import ModelConfig

    return ModelConfig(model_type="qwen3_moe", qk_norm=True, tie_word_embeddings=True, rope_theta=1e6,
                       rms_norm_eps=1e-6, max_position_embeddings=40960, **SHAPES[shape], **MOE)


class Ours:
    """The jitted value-and-grad of the mean next-token cross-entropy."""

    def __init__(self, config, params, ids):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from rwml_jax.rl.logprobs import completion_logprobs

        B, T = ids.shape
        self.batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones((B, T), jnp.int32),
                      "completion_start": jnp.ones((B,), jnp.int32), "completion_mask": jnp.ones((B, T - 1), jnp.int32)}

        def loss(p, batch):
            logp, _ = completion_logprobs(config, p, batch)
            return -jnp.mean(logp)

        self.fn = jax.jit(jax.value_and_grad(loss))
        self.params = params
        self.np = np

    def __call__(self) -> tuple[float, float]:
        import jax

        t = time.perf_counter()
        loss, grads = self.fn(self.params, self.batch)
        jax.block_until_ready(grads)
        return time.perf_counter() - t, float(loss)


class Peer:
    """transformers' Qwen3MoeForCausalLM: forward with labels, backward."""

    def __init__(self, path: str, ids):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.train()
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.impl = getattr(self.model.config, "_experts_implementation", None) or "default"

    def __call__(self, threads: int) -> tuple[float, float]:
        self.torch.set_num_threads(threads)
        self.model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        return time.perf_counter() - t, float(loss.detach())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    from rwml_jax.models import decoder, hf_io

    config = moe_config()
    params = decoder.init_params(config, jax.random.PRNGKey(args.seed))
    ids = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    print(f"# {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), {config.num_params / 1e6:.2f}M parameters "
          f"({config.num_active_params / 1e6:.2f}M active), batch {args.batch} x {args.seq_len} tokens", flush=True)
    ours = Ours(config, params, ids)
    t0 = time.perf_counter()
    _, loss_ours = ours()
    compile_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.save_pretrained(config, params, tmp)
        peer = None if args.no_peer else Peer(tmp, ids)
    threads = sorted({1, args.threads})
    loss_peer = None
    if peer is not None:
        for th in threads:
            _, loss_peer = peer(th)  # warm-up
    t_ours: list[float] = []
    t_peer: dict[int, list[float]] = {th: [] for th in threads}
    for _ in range(args.repeats):
        t_ours.append(ours()[0])
        for th in threads if peer is not None else []:
            t_peer[th].append(peer(th)[0])
    tokens = args.batch * args.seq_len
    row: dict[str, Any] = dict(shape="tiny-moe", batch=args.batch, seq_len=args.seq_len, ours_s=statistics.median(t_ours),
                               compile_s=compile_s, loss_ours=loss_ours, runs_ours=t_ours)
    row["ours_tok_s"] = tokens / row["ours_s"]
    if peer is not None:
        med = {th: statistics.median(ts) for th, ts in t_peer.items()}
        best = min(med, key=med.get)
        row.update(peer_s=med[best], peer_threads=best, peer_s_by_threads=med, loss_peer=loss_peer,
                   peer_experts=peer.impl, ratio=med[best] / row["ours_s"])
        row["peer_tok_s"] = tokens / row["peer_s"]
    print("| workload | ours | transformers | ratio | losses (ours / peer) | compile |")
    print("|---|---|---|---|---|---|")
    if peer is not None:
        print(f"| tiny-moe fwd+bwd, {args.batch} x {args.seq_len} | {row['ours_s'] * 1e3:.0f} ms "
              f"({row['ours_tok_s']:.0f} tok/s) | {row['peer_s'] * 1e3:.0f} ms ({row['peer_tok_s']:.0f} tok/s, "
              f"{best} thread(s), experts {peer.impl}) | {row['ratio']:.2f}x | {loss_ours:.5f} / {loss_peer:.5f} | "
              f"{compile_s:.1f} s |")
    else:
        print(f"| tiny-moe fwd+bwd | {row['ours_s'] * 1e3:.0f} ms | - | - | {loss_ours:.5f} | {compile_s:.1f} s |")
    return row


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="sequences per pass (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each side; median (default 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch's largest thread count")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and tokens (default 0)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the row as JSON to this file")
    args = p.parse_args(argv)
    row = run(args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
