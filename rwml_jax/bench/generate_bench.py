"""Generation throughput: the jitted sampler vs Hugging Face `transformers` generate, in the same run.

Workload (docs/benchmarks.md, "Generation (rollout)"): batch 16, prompt 128 random token ids each,
128 new tokens, no early stop; greedy, then temperature 1.0 / top-p 1.0 sampling. Qwen3-architecture
models with random (seeded) weights in the shapes `tiny`, `small` (and `qwen3-0.6b` on request).
Figure: generated tokens per second (16 x 128 / wall time of one generate call, prompt processing
included), median over `--repeats` calls after one warm-up call; the JAX compile time is reported
separately. Peer: `transformers` generate (PyTorch, KV cache on), timed interleaved with ours so both see
the same machine load. Threads: `--threads` sets both JAX's (XLA CPU intra-op pool) and PyTorch's; the peer
is also measured with 1 thread (`--peer-threads`), because on a machine shared with other jobs PyTorch's
OpenMP pool can be several times slower with 2 threads than with 1; the ratio is taken against the
fastest peer configuration. Also printed: the load average, the measured float32 matmul peak and the
decode MFU (2 x params x tokens/s / peak).

    python -m rwml_jax.bench.generate_bench                       # tiny + small on CPU, with the peer
    python -m rwml_jax.bench.generate_bench --shapes qwen3-0.6b --repeats 1
    python -m rwml_jax.bench.generate_bench --device gpu          # qwen3-0.6b, bfloat16, HBM bandwidth

GPU mode (`--device gpu`): qwen3-0.6b in bfloat16 (bfloat16 KV cache), the peer `transformers` generate on
the same GPU in the same dtype (its default attention implementation), interleaved. Besides tokens/s it
reports the decode step time (t(128 new tokens) - t(1 new token), over 127 steps) and the fraction of
peak memory bandwidth it reaches: bytes read per decode step (all parameters + the whole KV cache, which
every step attends over) / step time / `--peak-bw` (default 4.8e12 B/s, an H200).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from rwml_jax.platform import reexec_with_malloc_tunables

SHAPES: dict[str, dict[str, int]] = {  # docs/benchmarks.md, "Model shapes"
    "tiny": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, intermediate_size=704),
    "small": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, intermediate_size=2048),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144),
}
MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0, top_p=1.0)}


def shape_config(name: str, dtype: str = "float32"):
    from rwml_jax.models.config import ModelConfig

    return ModelConfig(model_type="qwen3", qk_norm=True, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, param_dtype=dtype, compute_dtype=dtype, **SHAPES[name])


def matmul_peak_gflops(seconds: float = 3.0) -> float:
    """Measured float32 2048^3 matmul GFLOP/s (JAX), best of several runs."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


class Ours:
    def __init__(self, config, batch: int, prompt_len: int, new_tokens: int, seed: int, orientation: str = "auto",
                 num_samples: int = 1):
        import jax
        import numpy as np

        from rwml_jax import sampling
        from rwml_jax.models import decoder

        if batch % num_samples:
            raise SystemExit(f"--num-samples {num_samples} does not divide --batch {batch}")
        self.config, self.new_tokens, self.num_samples, self.batch = config, new_tokens, num_samples, batch
        self.params = decoder.init_params(config, jax.random.key(seed))
        rng = np.random.default_rng(seed)
        # batch / num_samples distinct prompts, each sampled num_samples times (a GRPO group)
        self.prompts = rng.integers(0, config.vocab_size, (batch // num_samples, prompt_len)).tolist()
        # params passed stacked, as an RL loop would after each update: every timed call includes the
        # per-call weight preparation
        self.sampler = sampling.Sampler(config, max_new_tokens=new_tokens, weight_orientation=orientation)

    def __call__(self, mode: str, new_tokens: int | None = None) -> float:
        t = time.perf_counter()
        out = self.sampler.generate(self.params, self.prompts, max_new_tokens=new_tokens or self.new_tokens, seed=1,
                                    stop_at_eos=False, num_samples=self.num_samples, **MODES[mode])
        dt = time.perf_counter() - t
        expected = self.batch * (new_tokens or self.new_tokens)
        assert out.num_generated == expected, (out.num_generated, expected)
        return dt


class Peer:
    """transformers generate on the same shapes (its own random weights; only shapes matter for speed)."""

    def __init__(self, config, batch: int, prompt_len: int, new_tokens: int, seed: int, device: str = "cpu",
                 dtype: str = "float32"):
        import torch
        import transformers

        torch.manual_seed(seed)
        d = config.to_hf_dict()
        d.pop("architectures")
        d.pop("model_type")
        d.update(eos_token_id=None, bos_token_id=None, pad_token_id=0)
        self.model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**d)).to(
            device=device, dtype=getattr(torch, dtype)).eval()
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen).to(device)
        self.new_tokens, self.device = new_tokens, device
        self.torch = torch

    def __call__(self, mode: str, threads: int = 0, new_tokens: int | None = None) -> float:
        if threads:
            self.torch.set_num_threads(threads)
        n = new_tokens or self.new_tokens
        kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        t = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(input_ids=self.ids, attention_mask=self.torch.ones_like(self.ids), use_cache=True,
                                      max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        dt = time.perf_counter() - t
        assert out.shape[1] == self.ids.shape[1] + n
        return dt


def run_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax

    peak = matmul_peak_gflops()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, jax {jax.__version__} ({jax.devices()[0].platform}, {args.threads} threads), "
          f"matmul peak {peak:.1f} GFLOP/s (float32, 2048^3), GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
          "(ours and the peer alike)", flush=True)
    peer_threads = sorted(set(args.peer_threads or [1, args.threads]))
    rows = []
    for shape in args.shapes:
        config = shape_config(shape, args.dtype)
        tokens = args.batch * args.new_tokens
        ours = Ours(config, args.batch, args.prompt_len, args.new_tokens, args.seed, args.weight_orientation,
                    args.num_samples)
        peer = None if args.no_peer else Peer(config, args.batch, args.prompt_len, args.new_tokens, args.seed)
        for mode in args.modes:
            compile_before = ours.sampler.compile_seconds
            warm = ours(mode)
            compile_s = ours.sampler.compile_seconds - compile_before
            for th in peer_threads if peer is not None else []:
                peer(mode, th, new_tokens=2)  # warm-up
            t_ours: list[float] = []
            t_peer: dict[int, list[float]] = {th: [] for th in peer_threads} if peer is not None else {}
            for _ in range(args.repeats):  # interleaved: all configurations see the same load
                t_ours.append(ours(mode))
                for th in t_peer:
                    t_peer[th].append(peer(mode, th))
            ours_tps = tokens / statistics.median(t_ours)
            peer_tps = {th: tokens / statistics.median(ts) for th, ts in t_peer.items()}
            best_th = max(peer_tps, key=peer_tps.get) if peer_tps else None
            best = peer_tps[best_th] if peer_tps else float("nan")
            row = dict(shape=shape, mode=mode, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       dtype=args.dtype, threads=args.threads, ours_tok_s=ours_tps, peer_tok_s=best,
                       peer_threads=best_th, peer_tok_s_by_threads=peer_tps, ratio=ours_tps / best,
                       compile_s=compile_s, first_call_s=warm, ours_s=t_ours, peer_s=t_peer,
                       weight_orientation=ours.sampler.weight_orientation,
                       params=config.num_params, mfu=2 * config.num_params * ours_tps / (peak * 1e9),
                       matmul_peak_gflops=peak, load_average=os.getloadavg()[0])
            rows.append(row)
            peers = ", ".join(f"{v:.1f} tok/s with {th} thread{'s' * (th > 1)}" for th, v in peer_tps.items())
            print(f"{shape:>10} {mode:>6}: ours {ours_tps:8.1f} tok/s (runs {[round(x, 2) for x in t_ours]} s, "
                  f"compile {compile_s:.1f} s, MFU {row['mfu']:.1%}, weights {row['weight_orientation']}); "
                  f"transformers {peers}; "
                  f"ratio vs fastest {row['ratio']:.2f}x; load {row['load_average']:.1f}", flush=True)
        del ours, peer
    print("\n| workload | model | ours tok/s | transformers tok/s | ratio | JAX compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| generate B{r['batch']} P{r['prompt_len']} N{r['new_tokens']} {r['mode']} ({r['dtype']}, CPU, "
              f"{r['threads']} threads; peer best with {r['peer_threads']}) | {r['shape']} | {r['ours_tok_s']:.0f} "
              f"| {r['peer_tok_s']:.0f} | {r['ratio']:.2f}x | {r['compile_s']:.1f} |")
    return rows


def run_gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import numpy as np

    dev = jax.devices()[0]
    if dev.platform not in ("gpu", "cuda", "rocm"):
        raise SystemExit(f"--device gpu: JAX sees no GPU (default device: {dev.platform}); install jax[cuda12]")
    rows = []
    for shape in args.shapes:
        config = shape_config(shape, args.dtype)
        ours = Ours(config, args.batch, args.prompt_len, args.new_tokens, args.seed, args.weight_orientation,
                    args.num_samples)
        peer = None if args.no_peer else Peer(config, args.batch, args.prompt_len, args.new_tokens, args.seed,
                                              device="cuda", dtype=args.dtype)
        for mode in args.modes:
            compile_before = ours.sampler.compile_seconds
            ours(mode)
            ours(mode, new_tokens=1)
            compile_s = ours.sampler.compile_seconds - compile_before
            if peer is not None:
                # warm-up at full length: after a short one, the first 128-token call still ran 4-6x slower
                # (PyTorch's caching allocator growing the KV cache, kernel selection for the new shapes)
                peer(mode)
            t_full, t_peer = [], []
            for _ in range(args.repeats):  # interleaved
                t_full.append(ours(mode))
                if peer is not None:
                    t_peer.append(peer(mode))
            t_one = [ours(mode, new_tokens=1) for _ in range(args.repeats)]
            full, one = statistics.median(t_full), statistics.median(t_one)
            peer_tps = args.batch * args.new_tokens / statistics.median(t_peer) if t_peer else float("nan")
            step_s = (full - one) / (args.new_tokens - 1)
            param_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(ours.params))
            c = config
            from rwml_jax.sampling.buckets import prompt_bucket

            S = ours.sampler.max_new_tokens + prompt_bucket(args.prompt_len)
            # every step reads the whole cache; with --num-samples n the rows' own N slots plus each prompt's
            # P slots once per group
            P = prompt_bucket(args.prompt_len)
            slots = args.batch * S if args.num_samples == 1 else (args.batch * ours.sampler.max_new_tokens
                                                                 + args.batch // args.num_samples * P)
            kv_bytes = (2 * c.num_hidden_layers * slots * c.num_key_value_heads * c.head_dim
                        * ours.sampler.cache_dtype.itemsize)
            bw = (param_bytes + kv_bytes) / step_s
            row = dict(shape=shape, mode=mode, device=dev.device_kind, dtype=args.dtype, batch=args.batch,
                       tok_s=args.batch * args.new_tokens / full, decode_tok_s=args.batch / step_s,
                       step_ms=step_s * 1e3, prefill_s=one, compile_s=compile_s, param_bytes=param_bytes,
                       kv_bytes=kv_bytes, bytes_per_s=bw, bw_fraction=bw / args.peak_bw, peer_tok_s=peer_tps,
                       ratio=args.batch * args.new_tokens / full / peer_tps, ours_s=t_full, peer_s=t_peer)
            rows.append(row)
            print(f"{shape} {mode} on {dev.device_kind}: {row['tok_s']:.0f} tok/s end to end, decode step "
                  f"{row['step_ms']:.2f} ms ({row['decode_tok_s']:.0f} tok/s), reads {(param_bytes + kv_bytes) / 1e9:.2f} "
                  f"GB/step = {bw / 1e12:.2f} TB/s = {row['bw_fraction']:.1%} of {args.peak_bw / 1e12:.2f} TB/s; "
                  f"compile {compile_s:.1f} s; transformers {peer_tps:.0f} tok/s, ratio {row['ratio']:.2f}x", flush=True)
        del ours, peer
    print("\n| workload | model | device | ours tok/s | transformers tok/s | ratio | decode step ms | HBM bandwidth "
          "used | JAX compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| generate B{r['batch']} P{args.prompt_len} N{args.new_tokens} {r['mode']} ({r['dtype']}) | {r['shape']} "
              f"| {r['device']} | {r['tok_s']:.0f} | {r['peer_tok_s']:.0f} | {r['ratio']:.2f}x | {r['step_ms']:.2f} "
              f"| {r['bw_fraction']:.0%} | {r['compile_s']:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu or gpu, side by side with transformers on that device; gpu adds the HBM bandwidth "
                        "fraction (default cpu)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                   help="model shapes (default: tiny small on cpu, qwen3-0.6b on gpu)")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["greedy", "sample"],
                   help="greedy and/or temperature-1.0 sampling (default both)")
    p.add_argument("--batch", type=int, default=16, help="sequences per generate call (default 16)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="ours: batch / N distinct prompts sampled N times each (`generate(num_samples=N)`: each "
                        "prompt prefilled once and read once per group); the peer runs B rows of the same shapes (its "
                        "speed does not depend on repeated prompts) (default 1: batch distinct prompts)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration; median (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads for JAX (XLA intra-op pool; 1 = single-threaded XLA) and PyTorch "
                        "(default: the core count)")
    p.add_argument("--peer-threads", type=int, nargs="+", default=None,
                   help="PyTorch thread counts to measure the peer with; the fastest is the reference "
                        "(default: 1 and --threads)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter / compute dtype (default float32 on cpu, bfloat16 on gpu)")
    p.add_argument("--peak-bw", type=float, default=4.8e12,
                   help="--device gpu: peak memory bandwidth in B/s (default 4.8e12, H200; H100 SXM 3.35e12)")
    p.add_argument("--weight-orientation", choices=("auto", "in_out", "out_in", "out_in_reduce"), default="auto",
                   help="the sampler's decode-layout weight format (default auto: per machine and model size)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and prompts (default 0)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    args.shapes = args.shapes or (["qwen3-0.6b"] if args.device == "gpu" else ["tiny", "small"])
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    if args.device == "cpu" and args.threads == 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false").strip()
    rows = run_gpu(args) if args.device == "gpu" else run_cpu(args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
