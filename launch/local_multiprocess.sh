#!/usr/bin/env bash
# N processes of nvae_jax on this machine, joined by jax.distributed (CPU by default): a rehearsal
# of a multi-host run.  Each process gets DEVICES_PER_PROCESS fake CPU devices; the global batch
# (data.batch_size) must divide by N * DEVICES_PER_PROCESS.  Logs go to $LOGDIR/process_<i>.log.
#
#   launch/local_multiprocess.sh 2 --config=configs/quickstart.py --workdir=/tmp/mp \
#       --config.train.num_steps=20
set -euo pipefail
N=${1:?usage: $0 NUM_PROCESSES [nvae_jax.main flags...]}
shift
PORT=${PORT:-$((20000 + RANDOM % 20000))}
LOGDIR=${LOGDIR:-/tmp/nvae_jax_multiprocess}
PYTHON=${PYTHON:-python}
mkdir -p "$LOGDIR"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    "$PYTHON" -m nvae_jax.main --distributed --coordinator_address="localhost:$PORT" \
      --num_processes="$N" --process_id="$i" "$@" >"$LOGDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGDIR/process_$i.log" >&2
    status=1
  fi
done
tail -n 5 "$LOGDIR/process_0.log"
exit $status
