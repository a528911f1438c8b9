"""`rwml-jax eval` and `rwml-jax compare`: agent success of a policy, and the paper's comparison table.

  rwml-jax eval --env alfworld --data ROOT --split valid_unseen --policy expert --json OUT
  rwml-jax eval --env alfworld --data ROOT --split valid_seen --policy runs/x/rwml --runs 3 --json OUT
  rwml-jax eval --env tau2 --domain airline --policy gold --runs 3 --json OUT
  rwml-jax eval rwml_alfworld --config.eval.runs=1       # the recipe's eval stage
  rwml-jax compare runs/base runs/rwml eval/policy_rl.json ...

--policy: `expert` / `gold` (ALFWorld walkthrough / τ² gold actions), `random` (seeded random admissible
action / random tool call), or a model: a Hugging Face folder, a stage folder holding model/ (e.g.
runs/x/rwml), sampled at --temperature (0 = greedy). A killed evaluation resumes when re-run with the same
arguments (the records next to --json are its progress).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rwml_jax import sharding as sh
from rwml_jax.cli_run import _cmd_run
from rwml_jax.envs import TAU2_DOMAINS as DOMAINS
from rwml_jax.envs.alfworld_data import (
    SPLIT_ALIASES,
    SPLITS,
    TASK_TYPES,
    AlfworldDataError,
)
from rwml_jax.evaluation import tasks as T
from rwml_jax.evaluation.compare import compare_table, load_rows
from rwml_jax.evaluation.harness import evaluate, markdown
from rwml_jax.evaluation.policies import (
    REFERENCE_POLICIES,
    gold_turns,
    model_policy,
    reference_policy,
)
from rwml_jax.evaluation.world_model import moved_fraction
from rwml_jax.models import load_pretrained
from rwml_jax.envs.user_spec import parse_user_spec
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.served_models import serve_users
from rwml_jax.train.runtime import load_tokenizer, resolve_model_path
from rwml_jax.train.stage_io import atomic_write_json, atomic_write_text


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="agent success of a policy on ALFWorld / τ²-Bench (mean ± std over runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None,
                   help="a recipe (as for `rwml-jax run`): run its eval stage, with --config.KEY=VALUE overrides; "
                        "without it, --env, --policy and --json say what to evaluate")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="with a recipe: as for run")
    p.add_argument("--dry-run", action="store_true", help="with a recipe: print the plan and exit")
    p.add_argument("--env", choices=["alfworld", "tau2"], default=None)
    p.add_argument("--policy", default=None,
                   help="expert | gold | random | a model folder (HF folder or a stage folder holding model/) "
                        "or a hub name (Qwen/Qwen3-0.6B; needs internet once)")
    p.add_argument("--json", dest="json_out", default=None, help="result JSON (progress files go beside it)")
    p.add_argument("--data", default=None, help="ALFWorld data folder (either layout, or generated games); "
                                                  "default $ALFWORLD_DATA")
    p.add_argument("--split", default=None, help=f"ALFWorld: one of {list(SPLITS)} or {sorted(SPLIT_ALIASES)} "
                                                  "(default valid_seen); τ²: its task split (default test)")
    p.add_argument("--task-types", nargs="+", choices=list(TASK_TYPES), default=None, metavar="TYPE")
    p.add_argument("--domain", choices=[*DOMAINS, "all"], default="all", help="τ² domain(s) (default all)")
    p.add_argument("--user", default="scripted",
                   help="τ² user simulator: scripted (the task's gold user turns, offline), scripted:<file>, "
                        "litellm:<model> or local:<hf folder> (served here with the project's sampler; a preset "
                        "name when --policy is a model folder, whose tokenizer it uses)")
    p.add_argument("--runs", type=int, default=3, help="runs with seeds seed..seed+runs-1 (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=30, help="agent steps per episode (default 30, the paper's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N games / tasks (per domain)")
    p.add_argument("--temperature", type=float, default=1.0, help="model sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model turn")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="model prompt budget per turn")
    p.add_argument("--history-length", type=int, default=2, help="(observation, action) pairs in ALFWorld prompts")
    p.add_argument("--num-envs", type=int, default=16, help="episodes played together (default 16)")
    p.add_argument("--workers", type=int, default=0, help="env worker processes (0 = one per core)")
    p.add_argument("--start", default=None,
                   help="start checkpoint of a model policy: also report the fraction of parameters that moved "
                        "by more than 1e-3 from it")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_eval, accepts_config_overrides=True)

    c = sub.add_parser("compare", help="Table-1-style comparison of evaluations (rows = methods)",
                       description="Rows: one per run folder (its eval/ stage) or evaluation JSON, named by the "
                                   "run / file; columns: ALFWorld ID, OOD, avg and τ² domains, avg (mean ± std).")
    c.add_argument("inputs", nargs="+", metavar="RUN_OR_EVAL")
    c.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON")
    c.set_defaults(func=_cmd_compare)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.config is not None:

        return _cmd_run(args, only=("eval",))
    missing = [f"--{n.replace('_out', '')}" for n in ("env", "policy", "json_out") if getattr(args, n) is None]
    if missing or args.config_overrides:
        what = f"{', '.join(missing)} required" if missing else f"unrecognized arguments {args.config_overrides}"
        print(f"error: without a recipe, rwml-jax eval needs --env, --policy and --json ({what})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    for name, v in (("--runs", args.runs), ("--max-steps", args.max_steps), ("--num-envs", args.num_envs)):
        if v < 1:
            print(f"error: {name} must be >= 1, got {v}", file=sys.stderr)
            return 2
    try:
        result = run_eval(args)
    except (AlfworldDataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    if "world_model" in result:
        print(f"\n{100 * result['world_model']['moved_fraction']:.2f} % of the parameters moved by more than 1e-3 "
              f"from {result['world_model']['start']}")
    print(f"\nwrote {args.json_out}")
    return 0


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    if args.env == "alfworld":
        split = args.split or "valid_seen"
        tasks = T.alfworld_tasks(args.data, split, task_types=args.task_types, limit=args.limit)
        factory, kwargs = T.ALFWORLD_FACTORY, {"data_dir": args.data, "max_steps": args.max_steps}
        where = {"data": os.path.abspath(args.data) if args.data else "$ALFWORLD_DATA", "split": tasks[0].spec.split}
        max_steps = args.max_steps
    else:
        split = args.split or "test"
        domains = list(DOMAINS) if args.domain == "all" else [args.domain]
        tasks = T.tau2_tasks(domains, split, limit=args.limit)
        max_steps = args.max_steps
        if args.policy in ("expert", "gold"):  # the gold conversation must fit: it is the harness' check

            max_steps = max(max_steps, *(len(gold_turns(t.group, split, t.task_id)) + 1 for t in tasks))
        factory = T.TAU2_FACTORY
        kwargs = {"user": args.user, "max_steps": max_steps, "max_messages": 10 * max_steps + 20,
                  "max_errors": max_steps + 10 if args.policy in ("expert", "gold") else 10}
        where = {"domains": domains, "split": split, "user": args.user}
    settings: dict[str, Any] = {"policy": args.policy, **where}
    if args.policy in REFERENCE_POLICIES:
        gen = reference_policy(args.policy, args.seed)
    else:
        model_dir = model_folder(args.policy)
        settings.update(policy=os.path.abspath(model_dir), temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
        gen = model_policy(load_model_generate_fn(model_dir, temperature=args.temperature, top_p=args.top_p,
                                                  seed=args.seed, max_new_tokens=args.max_new_tokens,
                                                  max_prompt_tokens=args.max_prompt_tokens))
    users = [args.user] if args.env == "tau2" else []
    policy_dir = None if args.policy in REFERENCE_POLICIES else model_folder(args.policy)
    local = any(parse_user_spec(u)[0] == "local" for u in users)
    with serve_users(users, mesh=sh.make_mesh(data=-1, fsdp=1, tensor=1) if local else None,
                     fallback_tokenizer=policy_dir or "",
                     max_prompt_tokens=8192, max_new_tokens=512, temperature=0.0, seed=args.seed) as endpoints:
        if endpoints:
            kwargs["endpoints"] = endpoints
        result = evaluate(tasks, gen, out=args.json_out, env=args.env, runs=args.runs, seed=args.seed,
                          factory=factory, factory_kwargs=kwargs, max_steps=max_steps, settings=settings,
                          num_envs=args.num_envs, num_workers=args.workers, history_length=args.history_length)
    if args.start and args.policy not in REFERENCE_POLICIES:

        result["world_model"] = {"moved_fraction": moved_fraction(model_folder(args.start), model_folder(args.policy)),
                                 "start": os.path.abspath(model_folder(args.start))}

        atomic_write_text(args.json_out, json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def model_folder(path: str) -> str:
    """The HF folder of a policy argument: the folder itself, its model/ subfolder (a stage folder), or a hub
    name ("Qwen/Qwen3-0.6B", fetched as the recipes' model.path is)."""
    p = Path(path)
    for cand in (p, p / "model"):
        if (cand / "config.json").is_file():
            return os.fspath(cand)
    if not p.exists() and path.count("/") == 1 and not path.startswith((".", "~")):
        return resolve_model_path(path, what="--policy")
    raise FileNotFoundError(f"--policy {path!r} is neither expert/gold/random nor a model folder (no config.json "
                            f"in it or in {os.fspath(p / 'model')})")


def load_model_generate_fn(model_dir: str, *, temperature: float, top_p: float, seed: int, max_new_tokens: int,
                           max_prompt_tokens: int):
    """A rollout generate_fn(prompts) sampling the model in `model_dir` on all local devices."""

    mesh = sh.make_mesh(data=-1, fsdp=1, tensor=1)
    model_config, params = load_pretrained(model_dir, mesh=mesh)
    policy = PolicySampler(model_config, load_tokenizer(model_dir), mesh, max_prompt_tokens=max_prompt_tokens,
                           max_new_tokens=max_new_tokens)
    return policy.generate_fn(params, temperature=temperature, top_p=top_p, seed=seed)


def _cmd_compare(args: argparse.Namespace) -> int:
    try:
        rows = load_rows(args.inputs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compare_table(rows))
    if args.json_out:

        atomic_write_json(args.json_out, rows)
        print(f"\nwrote {args.json_out}")
    return 0
