"""The package's dependencies run one way: platform / sharding -> models -> sampling -> rl -> rwml -> train ->
cli, with envs and agent beside them (they import nothing of the model side). Every import of a
`rwml_jax` module, at module level or inside a function, is checked against that order."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rwml_jax"

# (layer, prefixes): a module may import modules of its own layer or lower ones
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("rwml_jax.platform", "rwml_jax.sharding", "rwml_jax.storage")),
    (1, ("rwml_jax.models",)),
    (2, ("rwml_jax.sampling",)),
    (3, ("rwml_jax.rl",)),
    (4, ("rwml_jax.rwml",)),
    (5, ("rwml_jax.config",)),
    (6, ("rwml_jax.train", "rwml_jax.evaluation")),
    (7, ("rwml_jax.cli", "rwml_jax.bench")),
]
# beside the model side: usable from rwml upwards, importing only each other and layer 0
SIDE = ("rwml_jax.envs", "rwml_jax.agent")
SIDE_LAYER = 4


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[int, bool] | None:
    """(layer, is_side) of a rwml_jax module; None for the package root."""
    if any(module == p or module.startswith(p + ".") for p in SIDE):
        return SIDE_LAYER, True
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") or module.startswith(p + "_") for p in prefixes):
            return layer, False
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `rwml_jax` import in the file (`from rwml_jax import x` counts as
    rwml_jax.x)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("rwml_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rwml_jax":
                out += [(node.lineno, f"rwml_jax.{a.name}") for a in node.names]
            elif node.module.startswith("rwml_jax."):
                out.append((node.lineno, node.module))
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in map(_module_name, PACKAGE.rglob("*.py")) if m != "rwml_jax" and _layer(m) is None]
    assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_imports_follow_the_layer_order():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        mine = _layer(me)
        if mine is None:
            continue
        for line, target in _imports(path):
            theirs = _layer(target)
            if theirs is None:
                continue
            (my_layer, my_side), (their_layer, their_side) = mine, theirs
            if my_side and not their_side and their_layer > 0:
                bad.append(f"{me}:{line} imports {target} (envs / agent import nothing of the model side)")
            elif not my_side and their_layer > my_layer:
                bad.append(f"{me}:{line} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


# Modules imported inside functions, and why: everything else is imported at module level, so the
# dependency graph can be read off the top of each file.
LAZY_TARGETS = {
    "rwml_jax.envs.tau2_env": "imports the tau2 package (litellm and its providers: seconds)",
    "rwml_jax.envs.tau2_users": "imports the tau2 package",
    "rwml_jax.envs.tau2_replay": "imports the tau2 package",
    "rwml_jax.models.embedder": "`rwml_jax.models` stays light to import; loading an embedder imports transformers",
    "rwml_jax.sampling": "rwml.rewards is read by config validation, which must not import JAX",
}
LAZY_PACKAGES = {
    "rwml_jax.bench": "benchmarks import JAX after the malloc re-exec, and their peers' subprocesses import no JAX",
}


def test_imports_inside_functions_are_the_stated_exceptions():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        if any(me.startswith(p) for p in LAZY_PACKAGES):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rwml_jax") \
                        and node.module not in LAZY_TARGETS:
                    bad.append(f"{me}:{node.lineno} imports {node.module} inside {fn.name}()")
    assert not bad, "import these at module level (or state why not in LAZY_TARGETS):\n" + "\n".join(bad)
