"""Reference policies that make the harness checkable, as rollout ``generate_fn(prompts, contexts)``s.

* `expert`: ALFWorld's walkthrough of the game (from its game.tw-pddl), one command per turn; τ²'s gold
  actions of the task (`rwml_jax.envs.tau2_gold.gold_script`: the gold tool calls, requests for the
  user-side actions, and the closing message with the required information). Named `gold` on τ².
* `random`: ALFWorld: a random admissible command; τ²: a call of a random tool of the domain with
  arguments drawn from its schema's types. Seeded per (seed, run seed, task, step), so an episode's
  actions do not depend on which other episodes were live, and a resumed evaluation replays them exactly.

Outputs are in the policy format the rollout parses (``<action>…</action>``, ``<tool_call>…</tool_call>``).
"""

from __future__ import annotations

import functools
import random
import string
import zlib
from collections.abc import Sequence
from typing import Any

from rwml_jax.agent.rollout import TurnContext
from rwml_jax.envs.alfworld_data import load_game_json
from rwml_jax.envs.tau2_gold import gold_script
from rwml_jax.envs.tau2_parse import format_tool_call

REFERENCE_POLICIES = ("expert", "gold", "random")
ALFWORLD_FALLBACK = "look"  # after the walkthrough ran out (never reached on a valid game)


def _rng(seed: int, ctx: TurnContext) -> random.Random:
    key = f"{seed}|{ctx.task.seed}|{dict(ctx.task.options).get('domain', '')}|{ctx.task.task_id}|{ctx.step}"
    return random.Random(zlib.crc32(key.encode()))


@functools.lru_cache(maxsize=512)
def _walkthrough(gamefile: str) -> tuple[str, ...]:
    walk = load_game_json(gamefile).get("walkthrough") or []
    if not walk:
        raise ValueError(f"ALFWorld game {gamefile} has no walkthrough: the expert policy cannot play it")
    return tuple(walk)


@functools.lru_cache(maxsize=512)
def gold_turns(domain: str, split: str, task_id: str) -> tuple[str, ...]:
    from rwml_jax.envs.tau2_env import load_tasks

    return tuple(gold_script(load_tasks(domain, split)[task_id])[0])


def expert_action(ctx: TurnContext) -> str:
    if ctx.task.env == "alfworld":
        walk = _walkthrough(ctx.reset_info["gamefile"])
        return f"<action>{walk[ctx.step] if ctx.step < len(walk) else ALFWORLD_FALLBACK}</action>"
    turns = gold_turns(dict(ctx.task.options)["domain"], ctx.task.split, ctx.task.task_id)
    return turns[ctx.step] if ctx.step < len(turns) else "###STOP###"


def _random_value(schema: dict[str, Any], rng: random.Random, depth: int = 0) -> Any:
    t = schema.get("type")
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if t == "integer":
        return rng.randint(0, 10)
    if t == "number":
        return round(rng.uniform(0, 100), 2)
    if t == "boolean":
        return rng.random() < 0.5
    if t == "array":
        return [] if depth > 1 else [_random_value(schema.get("items", {}), rng, depth + 1)]
    if t == "object":
        props = schema.get("properties", {})
        return {} if depth > 1 else {k: _random_value(v, rng, depth + 1) for k, v in props.items()}
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=8))


def random_action(ctx: TurnContext, seed: int) -> str:
    rng = _rng(seed, ctx)
    if ctx.task.env == "alfworld":
        return f"<action>{rng.choice(ctx.admissible) if ctx.admissible else ALFWORLD_FALLBACK}</action>"

    fn = rng.choice(ctx.tools)["function"]
    params = fn.get("parameters", {})
    args = {k: _random_value(params.get("properties", {}).get(k, {}), rng) for k in params.get("required", [])}
    return format_tool_call(fn["name"], args)


def reference_policy(name: str, seed: int = 0):
    """generate_fn(prompts, contexts) -> list[str] of the reference policy `name` (expert | gold | random)."""
    if name in ("expert", "gold"):
        return lambda prompts, contexts: [expert_action(c) for c in contexts]
    if name == "random":
        return lambda prompts, contexts: [random_action(c, seed) for c in contexts]
    raise ValueError(f"unknown reference policy {name!r}; expected one of {REFERENCE_POLICIES} or a model folder")


def model_policy(generate_fn):
    """Adapt a model's rollout generate_fn(prompts) to the harness' generate_fn(prompts, contexts)."""
    def fn(prompts: Sequence[Any], contexts: Sequence[TurnContext]) -> Any:
        return generate_fn(list(prompts))

    return fn
