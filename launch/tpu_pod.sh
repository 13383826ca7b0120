#!/usr/bin/env bash
# Runs nvae_jax on every worker of a Cloud TPU VM pod slice; jax.distributed.initialize() finds
# the other workers through the TPU metadata.  The repository (with its venv) must already be at
# $REPO on every worker (e.g. a gcloud ... scp --worker=all, or a shared disk), and --workdir
# should be a gs:// bucket or a shared filesystem.
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/nvae_imagenet32.py \
#       --workdir=gs://bucket/nvae_in32 --config.data.data_dir=gs://bucket/tfds
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/nvae_jax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd $REPO && NVAE_JAX_DISTRIBUTED=1 ${PYTHON:-.venv/bin/python} -m nvae_jax.main$ARGS"
