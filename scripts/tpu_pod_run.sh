#!/usr/bin/env bash
# Runs ONE gqa-t5x command on every worker of a Cloud TPU VM pod slice, the
# way T5X jobs are launched: the same command on all hosts, each calling
# jax.distributed.initialize() (--multi_host is appended to gqa_t5x.main
# commands). This is the launcher for `gqa-t5x sweep --mode print`:
#
#   gqa-t5x sweep configs/sweeps/paper_groups.gin --output gs://BUCKET/groups \
#     --mode print --launcher "scripts/tpu_pod_run.sh my-v4-128 us-central2-b --"
#
# prints one such command per run; launch them in order (or from your job
# scheduler). A preempted run resumes from its MODEL_DIR when relaunched.
#
# Usage: scripts/tpu_pod_run.sh TPU_NAME ZONE -- COMMAND [ARGS...]
# Environment: REMOTE_DIR (checkout on the workers, default ~/gqa-t5x),
#              PROJECT (gcloud project, default: gcloud's configured one).
set -euo pipefail

if [[ $# -lt 4 || "$3" != "--" ]]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 3
REMOTE_DIR=${REMOTE_DIR:-'~/gqa-t5x'}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}

CMD=$(printf '%q ' "$@")
if [[ "$*" == *"gqa_t5x.main"* ]]; then
  CMD+="--multi_host"
fi
exec gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
  --worker=all --command="cd ${REMOTE_DIR} && ${CMD}"
