"""`rwml-jax generate`: sample completions from a Hugging Face model folder or hub name (or a tiny offline demo model).

    rwml-jax generate --model ~/models/Qwen3-0.6B --chat --prompt "What is 2+2?" --temperature 0.7
    rwml-jax generate --tiny --prompt "Action: go to" --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import sys
import time

from rwml_jax import models, sampling, sharding
from rwml_jax.sampling import tiny
from rwml_jax.train.runtime import resolve_model_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample completions with the jitted sampler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face model folder (config.json + *.safetensors + tokenizer files) "
                                      "or hub name (Qwen/Qwen3-0.6B; downloaded once, needs internet)")
    src.add_argument("--tiny", action="store_true",
                     help="use a freshly built tiny random Qwen3 model and a small BPE tokenizer (offline demo)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model folder")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a batch (default: one built-in prompt)")
    p.add_argument("--chat", action="store_true",
                   help="treat each prompt as a user message and apply the tokenizer's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold in (0, 1]; 1 = off (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default 0)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--stop", action="append", default=None, help="stop string; repeat for several")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the model's / tokenizer's EOS token")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter and compute dtype (default float32)")
    p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="KV cache dtype (default: the model's compute dtype)")
    p.add_argument("--data", type=int, default=-1, help="mesh size of the data axis (-1 = all devices left)")
    p.add_argument("--fsdp", type=int, default=1, help="mesh size of the fsdp axis (default 1)")
    p.add_argument("--tensor", type=int, default=1, help="mesh size of the tensor axis (default 1)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the batch this many times; later runs show the compiled (warm) speed (default 1)")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace, mesh):
    if args.tiny:

        tok = tiny.tiny_tokenizer()
        config, params = tiny.tiny_model(tok, seed=args.seed)
        if args.dtype != "float32":
            config = config.replace(param_dtype=args.dtype, compute_dtype=args.dtype)
            import jax

            params = jax.tree.map(lambda a: a.astype(args.dtype), params)
        return config, params, tok
    from transformers import AutoTokenizer

    config, params = models.load_pretrained(args.model, dtype=args.dtype, mesh=mesh)
    tok_path = args.tokenizer or args.model
    try:
        tok = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"rwml-jax generate: no tokenizer in {tok_path!r} ({e}); pass --tokenizer DIR") from e
    return config, params, tok


def run(args: argparse.Namespace) -> int:
    if args.model:
        try:  # a local folder or a hub name, as the recipes' model.path
            args.model = resolve_model_path(args.model, what="--model")
        except FileNotFoundError as e:
            print(f"rwml-jax generate: {e}", file=sys.stderr)
            return 2
    mesh = sharding.make_mesh(args.data, args.fsdp, args.tensor)
    config, params, tok = _load(args, mesh)
    texts = args.prompt or ["Your task is to: put a clean mug in the coffeemachine."]
    if args.chat:
        convs = [([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": t}]
                 for t in texts]
        prompts = sampling.apply_chat_template(tok, convs)
    else:
        prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    sampler = sampling.SamplerPool().get(config, args.max_new_tokens, mesh=mesh, cache_dtype=args.cache_dtype)
    for r in range(max(1, args.repeat)):
        compile_before = sampler.compile_seconds
        t0 = time.perf_counter()
        out = sampler.generate(
            params, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed + r, stop_strings=args.stop, tokenizer=tok, stop_at_eos=not args.no_eos,
        )
        seconds = time.perf_counter() - t0
        compile_s = sampler.compile_seconds - compile_before
        if r == 0:
            for i, res in enumerate(out):
                print(f"[{i}] {res.text!r}  ({res.num_tokens} tokens, {res.finish_reason})")
        run_s = max(seconds - compile_s, 1e-9)
        print(f"run {r + 1}: {out.num_generated} tokens in {run_s:.3f} s = {out.num_generated / run_s:.1f} tokens/s"
              + (f" (plus {compile_s:.1f} s compiling)" if compile_s > 0 else ""))
    return 0
