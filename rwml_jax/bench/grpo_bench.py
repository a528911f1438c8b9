"""GRPO step: the jitted, sharded update (and the whole iteration) vs TRL's `GRPOTrainer`, in the same run.

Workload (docs/benchmarks.md, "GRPO step"): 8 prompts x group 8 = 64 sequences, prompt 128
random token ids, completion 128 tokens (no early stop), one AdamW step, policy log-probs recomputed,
KL to a frozen reference with the k3 estimator (beta = 0.04). Qwen3-architecture models with random
(seeded) weights, shapes `tiny` and `small`. Reward: 1 when the last completion token is even (cheap
and verifiable on both sides; only the shapes matter for speed).

Figures, median over `--steps` iterations after `--warmup` (compilation for ours, first-step set-up
for TRL), wall-clock seconds:
  (a) update alone: ours = the jitted step (reference forward, policy forward + backward over
      micro-batches, clipping, AdamW); TRL = its step minus generation and reward time (so its
      reference / old-policy forwards count as update, as ours do);
  (b) full iteration = generate the 64 completions + score (rewards, advantages, packing) + update;
      ours is `rwml_jax.rl.iteration.grpo_iteration`, the rwml stage's iteration.
Ours shares each group's prompt (the default; `--no-shared-prompts` turns it off): the sampler
prefills the 8 distinct prompts once (`num_samples=8`) and the update runs each prompt through the model
once per group (`GRPOConfig.prompt_group_size=8`, `rwml_jax.rl.shared_prompt`), i.e. the layers process
8 x (128 + 8 x 128) = 9,216 tokens per pass instead of 64 x 256 = 16,384, for the same update up to float
rounding. `--also-flat` measures the per-row path too, interleaved, as a third column.
Update MFU = (6 x params x tokens + 2 x params x tokens for the reference forward) / update time /
matmul peak, tokens = 64 x 256 (the workload's definition: it credits the per-row work, so with shared
prompts it exceeds what the machine executed); "executed" MFU counts the tokens the layers actually
process instead (9,216 with shared prompts). The peak is the float32 2048^3 matmul GFLOP/s measured in the same run
(JAX/XLA, NumPy and PyTorch, best of each, before and after); MFU is given against the best of them
(the physical peak) and against XLA's own matmul.

Fairness: TRL runs in a subprocess (its own memory), with the same thread count, and each of its steps
is released by this process only after our iteration, so the two alternate and see the same machine
load. TRL config: GRPOConfig(num_generations=8, per_device_train_batch_size=`--trl-micro-batch` with
gradient accumulation up to 64 completions per optimizer step, max_completion_length=128,
min_new_tokens=128, beta=0.04, loss_type="dapo" (token mean, as ours), temperature 1, no vLLM, no
eval, no saving, use_cpu). Tokenizer: a word-level tokenizer "w0".."w{V-1}" built offline, one word =
one token, so the 128-word prompts are exactly 128 tokens.

The workload's lengths, dtype and device are options: the GPU check (`launch/gpu_check.sh`) runs the paper's
world-model shapes, 2,048-token prompts and 512-token completions in bfloat16, with MFU against the GPU's
bfloat16 peak (`--peak-tflops`) and TRL on the same GPU.

    python -m rwml_jax.bench.grpo_bench                      # tiny + small, with TRL
    python -m rwml_jax.bench.grpo_bench --shapes tiny --steps 3 --no-peer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from rwml_jax.platform import reexec_with_malloc_tunables
from rwml_jax.bench.generate_bench import SHAPES, shape_config

GROUPS, GROUP_SIZE, BETA = 8, 8, 0.04


@dataclasses.dataclass(frozen=True)
class Workload:
    """The benchmark's shape: `groups` prompts x `group_size` completions, `prompt_len` prompt tokens and
    `completion_len` generated tokens per sequence; `dtype` of the parameters and matmuls; `device` cpu | gpu
    (where TRL runs)."""

    prompt_len: int = 128
    completion_len: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    groups: int = GROUPS
    group_size: int = GROUP_SIZE

    @property
    def sequences(self) -> int:
        return self.groups * self.group_size

    def flags(self) -> list[str]:
        return ["--prompt-len", str(self.prompt_len), "--completion-len", str(self.completion_len),
                "--dtype", self.dtype, "--device", self.device]
TRL_MARK = "@@TRL "
# Ours: the fastest measured on the 2-vCPU Zen 4 machine. `tiny` with 4 sequences (1,024 tokens) per
# micro-batch keeps each pass's activations and logits in L3: 4.07 against 4.91 s per update with 32
# (interleaved, 8 steps each); `small`: 4, 8 and 16 within the noise (74.1 / 74.9 / 80.1 s).
# TRL: its update time does not depend on it (`tiny`: 8.84-8.90 s for 4, 16 and 64).
DEFAULT_MICRO = {"tiny": 4, "small": 16, "qwen3-0.6b": 8}
# With shared prompts a micro-batch holds whole groups; one group of 8 (128 + 1,024 tokens) for `tiny`:
# 3.27 s against 3.35 s with two groups and 4.83 s per-row with 4 sequences (interleaved, 6 steps each).
DEFAULT_MICRO_SHARED = {"tiny": 8, "small": 16, "qwen3-0.6b": 8}
DEFAULT_TRL_MICRO = {"tiny": 64, "small": 16, "qwen3-0.6b": 8}


# ---------------------------------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------------------------------

def matmul_peaks(seconds: float = 2.0) -> dict[str, float]:
    """Best float32 2048^3 matmul GFLOP/s of XLA (jit), NumPy and PyTorch within `seconds` each."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    flops = 2 * n**3
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    ja = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    f(ja).block_until_ready()
    fns = {"xla": lambda: f(ja).block_until_ready(), "numpy": lambda: a @ a}
    try:
        import torch

        ta = torch.from_numpy(a)
        fns["torch"] = lambda: ta @ ta
    except ImportError:
        pass
    out = {}
    for name, fn in fns.items():
        fn()
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = flops / best / 1e9
    return out


def reward_last_token_even(token_ids: list[int]) -> float:
    return float(len(token_ids) > 0 and token_ids[-1] % 2 == 0)


# ---------------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------------

class Ours:
    """Sampler + jitted GRPO update on a single-process mesh over all local devices."""

    def __init__(self, shape: str, micro_batch: int, seed: int, shared: bool = True, w: Workload = Workload()):
        import jax
        import numpy as np

        from rwml_jax import sharding as sh
        from rwml_jax.models import decoder
        from rwml_jax.rl.train_state import OptimizerConfig, create_train_state, make_optimizer
        from rwml_jax.rl.update import GRPOConfig, make_grpo_step
        from rwml_jax.sampling import Sampler

        self.w = w
        self.config = shape_config(shape, w.dtype)
        self.mesh = sh.make_mesh()
        params = decoder.init_params_sharded(self.config, jax.random.key(seed), self.mesh)
        self.ref = jax.tree.map(lambda x: x.copy(), params)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6, max_grad_norm=1.0))
        self.shared = shared
        self.grpo = GRPOConfig(kl_coef=BETA, kl_estimator="k3", loss_agg="token-mean", micro_batch_size=micro_batch,
                               prompt_group_size=GROUP_SIZE if shared else 0)
        self.step = make_grpo_step(self.config, self.grpo, optimizer, self.mesh)
        self.state = create_train_state(params, optimizer, self.step.state_shardings)
        del params
        self.sampler = Sampler(self.config, max_new_tokens=w.completion_len, mesh=self.mesh)
        rng = np.random.default_rng(seed)
        self.distinct = [rng.integers(3, self.config.vocab_size, w.prompt_len).tolist() for _ in range(w.groups)]

    @property
    def layer_tokens(self) -> int:
        """Tokens the layers process per forward pass over the batch."""
        w = self.w
        if self.shared:
            return w.groups * (w.prompt_len + w.group_size * w.completion_len)
        return w.sequences * (w.prompt_len + w.completion_len)

    def sample(self, params: Any, prompts: list[list[int]], n: int, seed: int) -> list[Any]:
        """`n` completions of each prompt, prompt by prompt (the `sample` of `grpo_iteration`)."""
        from rwml_jax.train.policy import Completion

        if self.shared:  # each prompt prefilled once for its n samples
            out = self.sampler.generate(params, prompts, max_new_tokens=self.w.completion_len, temperature=1.0, seed=seed,
                                        stop_at_eos=False, num_samples=n)
        else:
            out = self.sampler.generate(params, [p for p in prompts for _ in range(n)], max_new_tokens=self.w.completion_len,
                                        temperature=1.0, seed=seed, stop_at_eos=False)
        return [Completion(r.token_ids, r.logprobs, "") for r in out]

    def iteration(self, it: int) -> dict[str, float]:
        """One `rwml_jax.rl.iteration.grpo_iteration` (the rwml stage's): generate, score (rewards,
        advantages, packing), update."""
        import numpy as np

        from rwml_jax.rl.iteration import grpo_iteration

        def score(completions):
            return np.asarray([reward_last_token_even(list(c.ids)) for c in completions], np.float32)

        self.state, m, rollouts = grpo_iteration(
            self.state, self.distinct, sample=self.sample, score=score, group_size=self.w.group_size, step_fn=self.step,
            pad_id=0, completion_len=self.w.completion_len, seed=it, prompt_multiple=self.w.prompt_len,
            ref_params=self.ref)
        return dict(generate=m["time/generate_s"], score=m["time/reward_s"] + m["time/pack_s"],
                    update=m["time/update_s"], total=m["time/step_s"], reward=m["reward_mean"], loss=m["loss"],
                    tokens=sum(len(c) for c in rollouts.completion_ids))


# ---------------------------------------------------------------------------------------------------
# TRL (subprocess)
# ---------------------------------------------------------------------------------------------------

def trl_worker(shape: str, steps: int, micro_batch: int, seed: int, w: Workload) -> int:
    """Runs TRL's GRPOTrainer; each optimizer step waits for a line on stdin and reports one JSON line."""
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    cfg = shape_config(shape)
    V = cfg.vocab_size
    on_gpu = w.device == "gpu"
    torch_dtype = getattr(torch, w.dtype)
    vocab = {f"w{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1",
                                                     unk_token="w2")
    hf = cfg.replace(eos_token_id=1, pad_token_id=0, bos_token_id=None).to_hf_dict()
    hf.pop("architectures", None)
    hf.pop("torch_dtype", None)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf)).to(torch_dtype)
    # TRL builds its reference model from the policy's path, so both come from a saved folder.
    model_dir = tempfile.mkdtemp(prefix="trl_grpo_model_")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model

    import random

    rnd = random.Random(seed)
    n_prompts = w.groups * (steps + 2)
    prompts = [" ".join(f"w{rnd.randrange(3, V)}" for _ in range(w.prompt_len)) for _ in range(n_prompts)]
    dataset = Dataset.from_dict({"prompt": prompts})
    accum = w.sequences // micro_batch

    def reward(completions, completion_ids=None, **_):
        return [reward_last_token_even(list(ids)) for ids in completion_ids]

    out_dir = tempfile.mkdtemp(prefix="trl_grpo_bench_")
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accum,
        steps_per_generation=accum, num_generations=w.group_size, max_completion_length=w.completion_len,
        generation_kwargs={"min_new_tokens": w.completion_len}, temperature=1.0, top_p=1.0, beta=BETA,
        loss_type="dapo", epsilon=0.2, num_iterations=1, learning_rate=1e-6, max_grad_norm=1.0,
        max_steps=steps, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=not on_gpu, bf16=w.dtype == "bfloat16", fp16=False, disable_tqdm=True, seed=seed, use_vllm=False,
        dataloader_num_workers=0, log_completions=False, model_init_kwargs={"dtype": torch_dtype},
    )

    timers = {"generate": 0.0, "reward": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t
        return wrapper

    class Gate(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            line = sys.stdin.readline()
            if not line:
                raise SystemExit(0)
            timers.update(generate=0.0, reward=0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.t0
            rec = dict(total=total, generate=timers["generate"], score=timers["reward"],
                       update=total - timers["generate"] - timers["reward"], step=state.global_step)
            print(TRL_MARK + json.dumps(rec), flush=True)

    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Gate()])
    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    print(TRL_MARK + json.dumps({"ready": True, "torch": torch.__version__, "trl": __import__("trl").__version__,
                                 "threads": torch.get_num_threads()}), flush=True)
    trainer.train()
    return 0


class TRLPeer:
    def __init__(self, shape: str, steps: int, micro_batch: int, seed: int, w: Workload):
        cmd = [sys.executable, "-m", "rwml_jax.bench.grpo_bench", "--trl-worker", "--shapes", shape,
               "--steps", str(steps), "--trl-micro-batch", str(micro_batch), "--seed", str(seed), *w.flags()]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.info = self._read()
        self.log: list[str] = []

    def _read(self) -> dict[str, Any]:
        tail: list[str] = []
        for line in self.proc.stdout:
            if line.startswith(TRL_MARK):
                return json.loads(line[len(TRL_MARK):])
            tail.append(line)
        raise RuntimeError("TRL worker exited:\n" + "".join(tail[-40:]))

    def step(self) -> dict[str, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except Exception:
            self.proc.kill()


# ---------------------------------------------------------------------------------------------------

def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    w = workload(args)
    peaks = [matmul_peaks()]
    shared = not args.no_shared_prompts
    micro = args.micro_batch or (DEFAULT_MICRO_SHARED if shared else DEFAULT_MICRO).get(shape, GROUP_SIZE)
    trl_micro = args.trl_micro_batch or DEFAULT_TRL_MICRO.get(shape, GROUP_SIZE)
    t = time.perf_counter()
    ours = Ours(shape, micro, args.seed, shared=shared, w=w)
    setup = time.perf_counter() - t
    flat = Ours(shape, DEFAULT_MICRO.get(shape, GROUP_SIZE), args.seed, shared=False, w=w) if args.also_flat and shared else None
    print(f"[{shape}] params {ours.config.num_params / 1e6:.2f}M, micro-batch {micro}, shared prompts {shared}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s); setup {setup:.1f}s", flush=True)
    peer = None if args.no_peer else TRLPeer(shape, args.warmup + args.steps, trl_micro, args.seed, w)
    if peer:
        print(f"[{shape}] TRL {peer.info['trl']} / torch {peer.info['torch']}, {peer.info['threads']} threads, "
              f"micro-batch {trl_micro}", flush=True)
    mine, theirs, per_row, first = [], [], [], {}
    try:
        for it in range(args.warmup + args.steps):
            tag = "warm-up" if it < args.warmup else "measured"
            for name, impl, rows in (("ours", ours, mine), ("flat", flat, per_row)):
                if impl is None:
                    continue
                r = impl.iteration(it)
                print(f"[{shape}] {name} {tag} {it}: generate {r['generate']:.2f}s score {r['score']:.3f}s update "
                      f"{r['update']:.2f}s total {r['total']:.2f}s (reward {r['reward']:.2f}, loss {r['loss']:+.4f})",
                      flush=True)
                if it >= args.warmup:
                    rows.append(r)
                elif it == 0 and name == "ours":
                    first = r
            if peer:
                q = peer.step()
                print(f"[{shape}] TRL  {tag} {it}: generate {q['generate']:.2f}s score {q['score']:.3f}s update "
                      f"{q['update']:.2f}s total {q['total']:.2f}s", flush=True)
                if it >= args.warmup:
                    theirs.append(q)
            if it + 1 == args.warmup:
                peaks.append(matmul_peaks())
    finally:
        if peer:
            peer.close()
    peaks.append(matmul_peaks())
    peak = {k: max(p[k] for p in peaks) for k in peaks[0]}
    best = args.peak_tflops * 1e3 if args.peak_tflops else max(peak.values())
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    tokens = w.sequences * (w.prompt_len + w.completion_len)
    flops = 8 * ours.config.num_params * tokens
    res: dict[str, Any] = dict(shape=shape, params=ours.config.num_params, micro_batch=micro, shared_prompts=shared,
                               workload=dataclasses.asdict(w), peak_tflops=best / 1e3,
                               peak_gflops=peak, update_flops=flops, first_iteration_s=first.get("total"),
                               setup_s=setup)
    for name, rows, impl in (("ours", mine, ours), ("flat", per_row, flat), ("trl", theirs, None)):
        if not rows:
            continue
        u, tot, gen = med(rows, "update"), med(rows, "total"), med(rows, "generate")
        res[name] = dict(update_s=u, total_s=tot, generate_s=gen, score_s=med(rows, "score"),
                         mfu=flops / u / (best * 1e9), mfu_xla=flops / u / (peak["xla"] * 1e9), steps=len(rows))
        if impl is not None:
            executed = 8 * impl.config.num_params * impl.layer_tokens
            res[name].update(executed_flops=executed, mfu_executed=executed / u / (best * 1e9))
    for name in ("ours", "flat"):
        if "trl" in res and name in res:
            suffix = "" if name == "ours" else "_flat"
            res["speedup_update" + suffix] = res["trl"]["update_s"] / res[name]["update_s"]
            res["speedup_total" + suffix] = res["trl"]["total_s"] / res[name]["total_s"]
    return res


def workload(args: argparse.Namespace) -> Workload:
    return Workload(prompt_len=args.prompt_len, completion_len=args.completion_len, dtype=args.dtype,
                    device=args.device)


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| shape | params | ours update s | TRL update s | update speed-up | ours iteration s (gen + score + "
          "update) | TRL iteration s | iteration speed-up | update MFU (vs best peak / vs XLA peak) | TRL MFU | "
          "matmul peak GFLOP/s (XLA / NumPy / torch) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        o, t, pk = r["ours"], r.get("trl"), r["peak_gflops"]
        if r.get("shared_prompts"):
            print(f"({r['shape']}: shared prompts; executed-FLOPs MFU {o['mfu_executed']:.0%})")
        if "flat" in r:
            f = r["flat"]
            extra = f", {r['speedup_update_flat']:.2f}x / {r['speedup_total_flat']:.2f}x TRL" if t else ""
            print(f"({r['shape']}: per-row prompts, interleaved: update {f['update_s']:.2f} s, iteration "
                  f"{f['total_s']:.2f} s (generate {f['generate_s']:.2f}), MFU {f['mfu']:.0%}{extra})")
        peaks = " / ".join(f"{pk[k]:.0f}" for k in ("xla", "numpy", "torch") if k in pk)
        if t:
            print(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {o['update_s']:.2f} | {t['update_s']:.2f} | "
                  f"{r['speedup_update']:.2f}x | {o['total_s']:.2f} ({o['generate_s']:.2f} + {o['score_s']:.2f} + "
                  f"{o['update_s']:.2f}) | {t['total_s']:.2f} ({t['generate_s']:.2f} gen) | {r['speedup_total']:.2f}x | "
                  f"{o['mfu']:.0%} / {o['mfu_xla']:.0%} | {t['mfu']:.0%} | {peaks} |")
        else:
            print(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {o['update_s']:.2f} | - | - | {o['total_s']:.2f} | - | - "
                  f"| {o['mfu']:.0%} / {o['mfu_xla']:.0%} | - | {peaks} |")


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES), help="model shapes")
    p.add_argument("--steps", type=int, default=3, help="measured iterations per shape (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first iterations (compilation, set-up)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="our micro-batch size in sequences (0: per-shape default: tiny 8 with shared prompts, "
                        "4 without; small 16)")
    p.add_argument("--trl-micro-batch", type=int, default=0,
                   help="TRL per_device_train_batch_size (0: tiny 64, small 16), gradient accumulation to 64")
    p.add_argument("--no-peer", action="store_true", help="skip TRL")
    p.add_argument("--no-shared-prompts", action="store_true",
                   help="every row runs its own copy of its group's prompt (prefill and update)")
    p.add_argument("--also-flat", action="store_true",
                   help="also measure the per-row path (no shared prompts), interleaved with the others")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--completion-len", type=int, default=128, help="generated tokens per sequence (default 128)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="params and matmuls")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where TRL runs (ours: JAX's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the accelerator's dense matmul peak in the benchmark's dtype (e.g. 989 for an H100/H200 in "
                        "bfloat16); MFU is against it instead of the measured float32 matmul peak")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.shapes[0], args.steps, args.trl_micro_batch, args.seed, workload(args))
    print(f"GRPO step benchmark on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (TRL's subprocess inherits it)", flush=True)
    results = [run_shape(s, args) for s in args.shapes]
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
