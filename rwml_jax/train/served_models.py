"""Second models a stage uses beside the policy: τ² user simulators and the LLM judge.

A served model is named ``local:<name>``: a Hugging Face folder or hub name (with its own tokenizer), or a
shape preset of configs/models.py (random init, sized to the policy's tokenizer: for tests and smoke runs).
It is loaded onto the run's mesh beside the policy and sampled with its own `PolicySampler` (own compiled
samplers and KV caches), one batched call for all chats at hand.

* `chat_generator(...)`: ``generate(list of chats) -> list of texts`` for one served model.
* `judge_generator(spec, ...)`: the same for the rwml stage's LLM judge (``rewards.judge``): ``local:<name>``
  as above, or ``litellm:<model>`` (any litellm provider, key from the environment; chats sent concurrently).
* `serve_users(...)`: a context manager that serves every ``local:`` user spec of a run to the env workers
  (`rwml_jax.envs.user_server.GenerationServer`) and yields the endpoints for the env factory
  (`rwml_jax.envs.tau2_env.make_env(..., endpoints=...)`); litellm and scripted users need no server.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from rwml_jax.config.recipes import import_configs_module
from rwml_jax.envs.user_spec import parse_user_spec
from rwml_jax.envs.user_server import GenerationServer
from rwml_jax.models import hf_io
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.decoder import init_params_sharded
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.runtime import load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

# A user simulator answers as a person, without reasoning (τ²'s own simulator is an instruct model; Qwen3's
# template would otherwise start every turn with a long <think>): templates without the variable ignore it.
USER_TEMPLATE_KWARGS = {"enable_thinking": False}

Chat = list[dict[str, Any]]


def _preset(name: str) -> dict[str, Any] | None:
    presets = import_configs_module("models").PRESETS
    return dict(presets[name]) if name in presets else None


def load_served_model(name: str, *, mesh: Any, fallback_tokenizer: str, dtype: str = "float32",
                      compute_dtype: str = "bfloat16", seed: int = 0) -> tuple[ModelConfig, Any, Any]:
    """(config, params, tokenizer) of a served model: a preset (random init with the tokenizer in folder
    `fallback_tokenizer`, the policy's) or a Hugging Face folder / hub name (its own tokenizer)."""
    preset = _preset(name) if not os.path.isdir(name) else None
    if preset is not None:
        if not fallback_tokenizer:
            raise ValueError(f"served model {name!r} is a shape preset (random init): it needs a tokenizer folder, "
                             "e.g. a model policy's; give a Hugging Face folder or hub name instead")
        tok = load_tokenizer(fallback_tokenizer)
        preset.update(vocab_size=max(len(tok), 8), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
        cfg = ModelConfig.from_hf_dict(preset, param_dtype=dtype, compute_dtype=compute_dtype)
        return cfg, init_params_sharded(cfg, jax.random.key(seed), mesh), tok
    path = resolve_model_path(name, what="served model")
    cfg, params = hf_io.load_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
    return cfg, params, load_tokenizer(path)


def chat_generator(name: str, *, mesh: Any, fallback_tokenizer: str, max_prompt_tokens: int, max_new_tokens: int,
                   temperature: float, seed: int, dtype: str = "float32", compute_dtype: str = "bfloat16",
                   weight_format: str = "auto", what: str = "served model",
                   template_kwargs: dict[str, Any] | None = None) -> Callable[[Sequence[Chat]], list[str]]:
    """``generate(chats) -> texts`` sampling the served model `name` (one batched call per invocation,
    a fresh seed each call). Replies cut at `max_new_tokens` are counted and logged. template_kwargs:
    extra chat-template variables."""
    cfg, params, tok = load_served_model(name, mesh=mesh, fallback_tokenizer=fallback_tokenizer, dtype=dtype,
                                         compute_dtype=compute_dtype, seed=seed)
    sampler = PolicySampler(cfg, tok, mesh, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                            weight_format=weight_format, template_kwargs=template_kwargs)
    calls = [0]

    def generate(chats: Sequence[Chat]) -> list[str]:
        calls[0] += 1
        _, comps = sampler.sample(params, list(chats), temperature=temperature, seed=seed * 7_919 + calls[0])
        cut = sum(c[0].truncated for c in comps)
        if cut:
            log.info("%s %s: %d of %d replies truncated at %d tokens", what, name, cut, len(comps), max_new_tokens)
        return [c[0].text for c in comps]

    log.info("%s %s: %s, %d layers, vocab %d", what, name, cfg.model_type, cfg.num_hidden_layers, cfg.vocab_size)
    return generate


@contextlib.contextmanager
def serve_users(specs: Sequence[str], *, mesh: Any, fallback_tokenizer: str, max_prompt_tokens: int,
                max_new_tokens: int, temperature: float, seed: int, dtype: str = "bfloat16",
                compute_dtype: str = "bfloat16", weight_format: str = "auto") -> Iterator[dict[str, Any]]:
    """Serve every ``local:`` spec among `specs` ("" ignored) for the env workers; yields {spec: endpoint}."""
    endpoints: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for spec in dict.fromkeys(s for s in specs if s):
            kind, name = parse_user_spec(spec)
            if kind != "local":
                continue
            gen = chat_generator(name, mesh=mesh, fallback_tokenizer=fallback_tokenizer,
                                 max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed + len(endpoints), dtype=dtype,
                                 compute_dtype=compute_dtype, weight_format=weight_format, what="user simulator",
                                 template_kwargs=USER_TEMPLATE_KWARGS)
            server = stack.enter_context(GenerationServer(gen, name=f"user {name}"))
            endpoints[spec] = server.endpoint
            stack.callback(lambda s=server, sp=spec: log.info("user simulator %s served %s", sp, s.stats()))
        yield endpoints


def serve_run_users(rt: Any, specs: Sequence[str]) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """`serve_users` with a run's settings: its mesh, the policy's tokenizer for presets, env.user_* lengths
    and temperature, the execution's weight format; parameters in model.compute_dtype (inference only)."""
    c = rt.config
    return serve_users(specs, mesh=rt.mesh, fallback_tokenizer=rt.tokenizer_path(),
                       max_prompt_tokens=c.env.user_max_prompt_tokens, max_new_tokens=c.env.user_max_new_tokens,
                       temperature=c.env.user_temperature, seed=c.seed, dtype=c.model.compute_dtype,
                       compute_dtype=c.model.compute_dtype, weight_format=c.execution.weight_format)


def litellm_generator(model: str, *, temperature: float, max_new_tokens: int,
                      workers: int = 16) -> Callable[[Sequence[Chat]], list[str]]:
    """``generate(chats) -> texts`` through litellm (network; the provider's key from the environment)."""
    from concurrent.futures import ThreadPoolExecutor

    import litellm

    def one(chat: Chat) -> str:
        r = litellm.completion(model=model, messages=list(chat), temperature=temperature, max_tokens=max_new_tokens)
        return r.choices[0].message.content or ""

    def generate(chats: Sequence[Chat]) -> list[str]:
        with ThreadPoolExecutor(max(1, min(workers, len(chats)))) as ex:
            return list(ex.map(one, chats))

    return generate


def judge_generator(rt: Any) -> Callable[[Sequence[Chat]], list[str]]:
    """The LLM judge of a run (rewards.judge: ``local:<folder or preset>`` | ``litellm:<model>``), sampled at
    rewards.judge_temperature with rewards.judge_max_new_tokens."""
    c, r = rt.config, rt.config.rewards
    kind, name = parse_user_spec(r.judge)
    if kind == "litellm":
        return litellm_generator(name, temperature=r.judge_temperature, max_new_tokens=r.judge_max_new_tokens)
    if kind != "local":
        raise ValueError(f"rewards.judge={r.judge!r}: expected 'local:<hf folder or preset>' or 'litellm:<model>'")
    return chat_generator(name, mesh=rt.mesh, fallback_tokenizer=rt.tokenizer_path(),
                          max_prompt_tokens=c.rwml.max_prompt_tokens, max_new_tokens=r.judge_max_new_tokens,
                          temperature=r.judge_temperature, seed=c.seed + 101, dtype=c.model.compute_dtype,
                          compute_dtype=c.model.compute_dtype, weight_format=c.execution.weight_format, what="judge")
