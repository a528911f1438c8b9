"""Memoising (and deferring) the pure, expensive parsing steps of ALFWorld's TextWorld-PDDL engine.

Profiling `textworld`'s PddlEnv on ALFWorld games shows most time in two deterministic functions:
- `fast_downward.pddl2sas(domain, problem)`: PDDL -> SAS+ translation, ~0.4-0.9 s per call. PddlState runs
  it twice (plain, and optimised for the planner) on every `load` *and* every `reset`, i.e. 4 translations
  per episode, 2 per repeated reset.
- `textworld.envs.pddl.textgen._parse_and_convert(text)`: parses a grammar string with tatsu. It runs for
  every admissible command's template on every step, although the templates are the same few strings.

`install()` does three things, all process-wide and idempotent (`uninstall()` restores the originals):
- wraps both functions with bounded LRU caches (for the grammar, the tatsu parse tree is cached and converted
  to fresh symbol objects on every call, because the engine writes into them);
- defers the *optimised* translation until the planner is first asked for a plan: it only feeds
  `downward_lib.replan` (the engine's "policy_commands" info, which the adapter never requests), so
  `pddl2sas(..., optimize=True)` returns a placeholder and the library returned by `fast_downward.load_lib`
  loads the real translation on its first `replan` call. A new game's load costs one translation, not two.
The engine code, its inputs and outputs are unchanged (tests check that the memoised engine produces
byte-identical observations, admissible commands and planner output); resets of a new game become ~2x, of an
already seen game ~10x, and steps ~2x faster. `AlfworldEnv(memoize=True)` (the default) installs it in its
process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_SAS_CACHE_SIZE = 8  # pddl2sas results (≈ 4 games x {plain, optimised}); each holds a translated task
_PARSE_CACHE_SIZE = 4096  # parsed grammar strings (small)

_originals: dict[str, Callable[..., Any]] = {}


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            self.hits += 1
            return self.data[key]
        self.misses += 1
        value = make()
        self.data[key] = value
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return value


_sas = _LRU(_SAS_CACHE_SIZE)
_parse = _LRU(_PARSE_CACHE_SIZE)
_deferred = {"created": 0, "translated": 0}


class _DeferredSasBytes(bytes):
    """What `_DeferredSas.encode()` gives `downward_lib.load_sas_replan`: empty bytes carrying the inputs of
    the optimised translation, which `_LazyReplanLib` recognises and translates on first `replan`."""

    domain: str
    problem: str
    verbose: bool


class _DeferredSas:
    """Placeholder for the optimised SAS text; PddlState only calls `.encode("utf-8")` on it."""

    def __init__(self, domain: str, problem: str, verbose: bool) -> None:
        self.domain, self.problem, self.verbose = domain, problem, verbose
        _deferred["created"] += 1

    def encode(self, *_args: Any, **_kwargs: Any) -> bytes:
        out = _DeferredSasBytes()
        out.domain, out.problem, out.verbose = self.domain, self.problem, self.verbose
        return out


class _LazyReplanLib:
    """A fast-downward library handle whose replan SAS is translated and loaded on the first `replan` call;
    every other attribute is the library's own."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._pending: _DeferredSasBytes | None = None

    def load_sas_replan(self, data: bytes) -> None:
        if isinstance(data, _DeferredSasBytes):
            self._pending = data
            return
        self._pending = None
        self._lib.load_sas_replan(data)

    def replan(self, *args: Any) -> Any:
        if self._pending is not None:
            d, self._pending = self._pending, None
            _task, sas = _sas.get((d.domain, d.problem, d.verbose, True),
                                  lambda: _originals["pddl2sas"](d.domain, d.problem, verbose=d.verbose,
                                                                 optimize=True))
            _deferred["translated"] += 1
            self._lib.load_sas_replan(sas.encode("utf-8"))
        return self._lib.replan(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


def install() -> None:
    """Patch fast_downward.pddl2sas and textworld's grammar parser with memoised versions (idempotent)."""
    if _originals:
        return
    import fast_downward
    import textworld.envs.pddl.textgen as textgen

    orig_sas = fast_downward.pddl2sas
    orig_parse = textgen._parse_and_convert
    orig_load_lib = fast_downward.load_lib

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        key = (domain, problem, bool(verbose), bool(optimize))
        if optimize and key not in _sas.data:  # only the planner reads it: translate on first replan
            return None, _DeferredSas(domain, problem, bool(verbose))
        return _sas.get(key, lambda: orig_sas(domain, problem, verbose=verbose, optimize=optimize))

    def load_lib() -> Any:
        return _LazyReplanLib(orig_load_lib())

    def parse_and_convert(*args: Any, **kwargs: Any) -> Any:
        # Same body as textgen._parse_and_convert, with the tatsu parse (pure) cached; the conversion
        # builds fresh Symbol objects every call, so the engine can keep writing into them.
        if kwargs.get("trace"):
            return orig_parse(*args, **kwargs)
        key = (args, tuple(sorted(kwargs.items())))
        model = _parse.get(key, lambda: textgen._PARSER.parse(*args, **kwargs))
        return textgen._Converter().walk(model)

    _originals["pddl2sas"] = orig_sas
    _originals["parse_and_convert"] = orig_parse
    _originals["load_lib"] = orig_load_lib
    fast_downward.pddl2sas = pddl2sas
    fast_downward.load_lib = load_lib
    textgen._parse_and_convert = parse_and_convert


def uninstall() -> None:
    """Restore the engine's original functions and drop the caches."""
    if not _originals:
        return
    import fast_downward
    import textworld.envs.pddl.textgen as textgen

    fast_downward.pddl2sas = _originals.pop("pddl2sas")
    fast_downward.load_lib = _originals.pop("load_lib")
    textgen._parse_and_convert = _originals.pop("parse_and_convert")
    _sas.data.clear()
    _parse.data.clear()


def installed() -> bool:
    return bool(_originals)


def stats() -> dict[str, int]:
    """Cache hit / miss counters (for tests and benchmarks)."""
    return {"sas_hits": _sas.hits, "sas_misses": _sas.misses,
            "parse_hits": _parse.hits, "parse_misses": _parse.misses,
            "replan_deferred": _deferred["created"], "replan_translated": _deferred["translated"]}
