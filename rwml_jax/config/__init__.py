"""Recipe configs: loading, command-line overrides, validation and provenance.

A recipe is a Python file exposing ``get_config()`` (or ``get_config(arg)``) that returns an
``ml_collections.ConfigDict``; the project's recipes live in the repository's ``configs/`` folder
(``configs/rwml_alfworld.py``, ``configs/rwml_tau2.py``, ``configs/demo_cpu.py``), and their shared
defaults, with one comment per field, in ``configs/base.py``.

    config = load_config("rwml_alfworld", ["--config.rwml.learning_rate=2e-6"])
    config = load_config("path/to/my_recipe.py:fast", ["--config.seed", "3"])

Everything that can be checked without doing work is checked in `load_config`: an unknown or mistyped
key raises `ConfigError` naming the closest valid key, a value that does not parse as the field's type or
is out of range raises `ConfigError` naming the field and what it accepts. The returned config is locked
(no new keys; values may still be assigned, type-checked by ml_collections).

Modules: `recipes` (finding and building recipes), `overrides` (``--config.KEY=VALUE`` through
ml_collections' config_flags), `validate` (one validator per section), `provenance` (JSON form, hashes),
`keys` (dotted keys, ConfigError), `stages` (STAGE_ORDER), `hyper` (a sweep file's points: sweep, product, zip).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from rwml_jax.config.keys import (
    ConfigDict,
    ConfigError,
    flatten,
    get_path,
    has_path,
    suggest_key,
)
from rwml_jax.config.overrides import apply_overrides
from rwml_jax.config.provenance import config_hash, config_to_dict, save_config, select
from rwml_jax.config.recipes import (
    available_recipes,
    build_recipe,
    configs_dir,
    import_configs_module,
    resolve_config_path,
)
from rwml_jax.config.stages import MODEL_STAGES, STAGE_ORDER
from rwml_jax.config.validate import validate_config

__all__ = [
    "MODEL_STAGES", "STAGE_ORDER", "ConfigDict", "ConfigError", "apply_overrides", "available_recipes", "config_hash",
    "config_to_dict", "configs_dir", "flatten", "get_path", "has_path", "import_configs_module", "load_config",
    "resolve_config_path", "save_config", "select", "suggest_key", "validate_config",
]


def load_config(path_or_name: str | os.PathLike, overrides: Sequence[str] = (), *, validate: bool = True) -> ConfigDict:
    """Load a recipe, apply ``--config.KEY=VALUE`` overrides, validate, lock.

    path_or_name: a recipe name in configs/ ("rwml_alfworld", "demo_cpu:fast") or a file path
      ("my.py", "my.py:arg"); the file's ``get_config()`` (or ``get_config(arg)``) builds the config.
    Raises ConfigError (unknown recipe or key, with the closest valid name; unparsable value; values out of
    range) before anything else happens.
    """
    config = build_recipe(str(path_or_name))
    config.lock()
    apply_overrides(config, list(overrides))
    if validate:
        validate_config(config)
    return config
