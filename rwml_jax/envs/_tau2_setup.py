"""Run before importing `tau2`: keep litellm offline at import and silence τ²'s logging.

* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: litellm (imported by tau2) otherwise fetches its model cost map from
  GitHub at import time.
* τ² logs through loguru: its whole registry at import and every tool call at DEBUG, to stderr. Disabled
  unless ``RWML_TAU2_LOG=1``.
"""

import os


def prepare_tau2_import() -> None:
    """Idempotent; call before the first ``import tau2``."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from loguru import logger

    if not os.environ.get("RWML_TAU2_LOG"):
        logger.disable("tau2")
