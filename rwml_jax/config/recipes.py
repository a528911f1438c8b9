"""Finding recipes: a name in the repository's configs/ folder or a file path, with an optional ``:arg``.

A recipe is a Python file exposing ``get_config()`` (or ``get_config(arg)``) that returns an
``ml_collections.ConfigDict``: ``"rwml_alfworld"``, ``"demo_cpu:smoke"``, ``"path/to/my.py:fast"``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

from rwml_jax.config.keys import ConfigDict, ConfigError

CONFIGS_DIR_ENV = "RWML_CONFIGS_DIR"


def configs_dir() -> Path | None:
    """The recipe folder: $RWML_CONFIGS_DIR, else the repository's configs/ (next to the package), else
    ./configs in the current directory. None when none of them exists."""
    candidates: list[Path] = []
    if os.environ.get(CONFIGS_DIR_ENV):
        candidates.append(Path(os.environ[CONFIGS_DIR_ENV]))
    candidates.append(Path(__file__).resolve().parents[2] / "configs")
    candidates.append(Path.cwd() / "configs")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def available_recipes() -> list[str]:
    """Names of the recipe files (those defining get_config) in `configs_dir()`."""
    d = configs_dir()
    if d is None:
        return []
    out = []
    for p in sorted(d.glob("*.py")):
        if p.stem.startswith("_") or p.stem in ("base", "models"):
            continue
        out.append(p.stem)
    return out


def _ensure_configs_package(folder: Path) -> None:
    """Make ``import configs.base`` work for recipes however rwml-jax was installed."""
    mod = sys.modules.get("configs")
    if mod is not None:
        paths = [str(Path(p).resolve()) for p in getattr(mod, "__path__", [])]
        if str(folder) in paths:
            return
        if paths:  # some other `configs` package is imported: put ours in front of its search path
            mod.__path__.insert(0, str(folder))  # type: ignore[attr-defined]
            return
    init = folder / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location("configs", init, submodule_search_locations=[str(folder)])
        assert spec and spec.loader
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["configs"] = pkg
        spec.loader.exec_module(pkg)
    else:
        pkg = types.ModuleType("configs")
        pkg.__path__ = [str(folder)]  # type: ignore[attr-defined]
        sys.modules["configs"] = pkg


def import_configs_module(name: str) -> types.ModuleType:
    """Import ``configs.<name>`` (e.g. "models", "base") from `configs_dir()`."""
    d = configs_dir()
    if d is None:
        raise ConfigError(f"cannot find the configs/ folder (looked next to the rwml_jax package and in "
                          f"{Path.cwd()}); set ${CONFIGS_DIR_ENV} to the folder holding the recipes")
    _ensure_configs_package(d)
    return importlib.import_module(f"configs.{name}")


def resolve_config_path(path_or_name: str) -> tuple[Path, str | None]:
    """``"name"``, ``"name:arg"``, ``"path.py"`` or ``"path.py:arg"`` -> (file, arg or None)."""
    spec, arg = path_or_name, None
    # split off ":arg" (but not a Windows drive letter "C:\...")
    head, sep, tail = path_or_name.rpartition(":")
    if sep and head and not (len(head) == 1 and tail.startswith(("\\", "/"))):
        spec, arg = head, tail
    p = Path(spec).expanduser()
    d = configs_dir()
    if p.suffix == ".py" or os.sep in spec or "/" in spec:
        if p.is_file():
            return p.resolve(), arg
        if d is not None and p.parent == Path(".") and (d / p.name).is_file():  # "demo_cpu.py"
            return (d / p.name).resolve(), arg
        raise ConfigError(f"config file {spec!r} does not exist")
    if d is not None and (d / f"{spec}.py").is_file():
        return (d / f"{spec}.py").resolve(), arg
    names = available_recipes()
    hint = difflib.get_close_matches(spec, names, n=1)
    msg = f"unknown recipe {spec!r}"
    if hint:
        msg += f"; did you mean {hint[0]!r}?"
    msg += f" (recipes in {d}: {', '.join(names) or 'none'})" if d else " (no configs/ folder found)"
    raise ConfigError(msg)


def _load_module(path: Path) -> types.ModuleType:
    folder = configs_dir()
    if folder is not None:
        _ensure_configs_package(folder)
    if folder is not None and path.parent == folder:
        return importlib.import_module(f"configs.{path.stem}")
    return import_file(path)


def import_file(path: Path, prefix: str = "_rwml_recipe") -> types.ModuleType:
    """Import the Python file `path` as a private module named ``<prefix>_<hash of the path>``."""
    name = f"{prefix}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_recipe(path_or_name: str) -> ConfigDict:
    """The (unlocked) ConfigDict that the recipe's ``get_config()`` / ``get_config(arg)`` returns."""
    path, arg = resolve_config_path(str(path_or_name))
    mod = _load_module(path)
    fn = getattr(mod, "get_config", None)
    if fn is None:
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        config = fn(arg) if arg is not None else fn()
    except TypeError as e:
        if arg is not None and "positional argument" in str(e):
            raise ConfigError(f"config file {path}: get_config() takes no argument, but {arg!r} was given") from None
        raise
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path.name}:{arg}: {e}" if arg is not None else f"{path.name}: {e}") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected ml_collections.ConfigDict")
    return config
