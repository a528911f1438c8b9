"""Memoising the two pure, expensive parsing steps of ALFWorld's TextWorld-PDDL engine.

Profiling `textworld`'s PddlEnv on ALFWorld games shows most time in two deterministic functions:
- `fast_downward.pddl2sas(domain, problem)`: PDDL -> SAS+ translation. PddlState runs it twice (plain and
  optimised) on every `load` *and* every `reset`, i.e. 4 translations per episode, 2 per repeated reset.
- `textworld.envs.pddl.textgen._parse_and_convert(text)`: parses a grammar string with tatsu. It runs for
  every admissible command's template on every step, although the templates are the same few strings.

`install()` wraps both with bounded LRU caches (for the grammar, the tatsu parse tree is cached and converted
to fresh symbol objects on every call, because the engine writes into them). The engine code, its inputs and
outputs are unchanged (tests check that the memoised engine produces byte-identical observations and
admissible commands); resets of an already seen game become ~10x and steps ~2x faster. It is process-wide
and idempotent; `uninstall()` restores the originals. `AlfworldEnv(memoize=True)` (the default) installs it
in its process.
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


def install() -> None:
    """Patch fast_downward.pddl2sas and textworld's grammar parser with memoised versions (idempotent)."""
    if _originals:
        return
    import fast_downward
    import textworld.envs.pddl.textgen as textgen

    orig_sas = fast_downward.pddl2sas
    orig_parse = textgen._parse_and_convert

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        return _sas.get((domain, problem, bool(verbose), bool(optimize)),
                        lambda: orig_sas(domain, problem, verbose=verbose, optimize=optimize))

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
    fast_downward.pddl2sas = pddl2sas
    textgen._parse_and_convert = parse_and_convert


def uninstall() -> None:
    """Restore the engine's original functions and drop the caches."""
    if not _originals:
        return
    import fast_downward
    import textworld.envs.pddl.textgen as textgen

    fast_downward.pddl2sas = _originals.pop("pddl2sas")
    textgen._parse_and_convert = _originals.pop("parse_and_convert")
    _sas.data.clear()
    _parse.data.clear()


def installed() -> bool:
    return bool(_originals)


def stats() -> dict[str, int]:
    """Cache hit / miss counters (for tests and benchmarks)."""
    return {"sas_hits": _sas.hits, "sas_misses": _sas.misses,
            "parse_hits": _parse.hits, "parse_misses": _parse.misses}
