#!/usr/bin/env bash
# Run `rwml-jax ARGS...` on every worker of a TPU pod slice at once (multi-host JAX).
# Needs: TPU_NAME, ZONE; the repo checked out at the same path on every worker (REPO_DIR, default ~/rwml-jax).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-~/rwml-jax}
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && RWML_DISTRIBUTED=1 LITELLM_LOCAL_MODEL_COST_MAP=True rwml-jax $ARGS"
