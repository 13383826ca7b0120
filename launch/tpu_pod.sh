#!/usr/bin/env bash
# Runs nvae_jax on every worker of a Cloud TPU VM pod slice; jax.distributed.initialize() finds
# the other workers through the TPU metadata.  The repository (with its venv) must already be at
# $REPO on every worker (e.g. a gcloud ... scp --worker=all, or a shared disk), and --workdir
# should be a gs:// bucket or a shared filesystem.
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/nvae_imagenet32.py \
#       --workdir=gs://bucket/nvae_in32 --config.data.data_dir=gs://bucket/tfds
#
# Preemption: a preempted or maintained TPU VM gets SIGTERM; nvae-jax finishes its step, writes a
# checkpoint of it, prints "Stopped by SIGTERM after step N" and exits with status 75
# (EX_TEMPFAIL) on every worker (a user error exits 2 with one line on stderr).  Rerun this script
# with the same flags once the slice is back (by hand, from a queued resource, or a retry loop on
# a non-zero status) and the run resumes from --workdir where it stopped.  gcloud's own status
# is non-zero when a worker's is, but need not be 75 itself.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/nvae_jax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd $REPO && NVAE_JAX_DISTRIBUTED=1 ${PYTHON:-.venv/bin/python} -m nvae_jax.main$ARGS"
