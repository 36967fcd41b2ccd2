#!/usr/bin/env bash
# Uptrain (or fine-tune) on every worker of a Cloud TPU VM pod slice with ONE
# command. Every worker runs the same launcher with --multi_host, which calls
# jax.distributed.initialize() (coordinator auto-detected on Cloud TPU) and the
# (data, model) mesh spans all chips. With DATA_CACHE_DIR (a cache written once
# by `gqa-t5x cache`, see docs/data.md) every host reads only its rows of each
# global batch, the batches do not depend on the slice's size, and a restart
# reads nothing it has consumed; without it each host streams its own seqio
# shard. Checkpoints in MODEL_DIR (a gs:// path) make the job restartable: run
# the same command again after a preemption and it resumes.
#
# Preemption: on SIGTERM (or SIGINT) the processes finish their step, agree on
# one step across hosts, save MODEL_DIR/checkpoint_<step> there and exit with
# status 75 ("preempted, resume me"); a second signal aborts at once and the
# newest complete checkpoint stays. Each worker relaunches itself after exit
# status 75 (up to MAX_RESTARTS times; the relaunched processes meet again at
# the coordinator and resume from that checkpoint). When the VMs themselves
# are taken away, rerun this script once the slice is back: it resumes too.
# The log pipe ignores SIGTERM, so the saving process can still print.
#
# Usage:
#   scripts/tpu_pod_train.sh TPU_NAME ZONE MODEL_DIR INITIAL_CHECKPOINT_PATH [--gin.X=Y ...]
#
# Example (GQA-8 T5.1.1-XXL, alpha = 0.05, 8-way model parallelism):
#   NUM_KV_HEADS=8 NUM_PARTITIONS=8 MODEL_GIN=gin/models/t5_1_1/xxl.gin \
#   scripts/tpu_pod_train.sh my-v4-128 us-central2-b \
#     gs://my-bucket/gqa8_xxl_uptrain gs://my-bucket/gqa8_xxl/checkpoint_1000000
#
# Environment:
#   SETUP=1          copy this checkout to every worker and pip install it first
#   REMOTE_DIR       checkout location on the workers (default: ~/gqa-t5x)
#   MODEL_GIN        model gin (default gin/models/t5_1_1/xxl.gin)
#   RUN_GIN          run gin (default gin/runs/uptrain.gin)
#   NUM_KV_HEADS     key/value heads of the converted checkpoint (default 8)
#   NUM_PARTITIONS   model-parallel shards (default 1)
#   TFDS_DATA_DIR    --tfds_data_dir for C4 (e.g. gs://my-bucket/tfds)
#   DATA_CACHE_DIR   the run's data cache (gqa-t5x cache), e.g. gs://my-bucket/c4_cache
#   PROJECT          gcloud project (default: gcloud's configured project)
#   MAX_RESTARTS     relaunches per worker after a preemption (exit 75; default 3)
#   RESTART_DELAY_S  seconds before such a relaunch (default 10)
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,40p' "$0" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; MODEL_DIR=$3; INIT_CKPT=$4; shift 4
EXTRA_FLAGS=("$@")

REMOTE_DIR=${REMOTE_DIR:-'~/gqa-t5x'}
MODEL_GIN=${MODEL_GIN:-gin/models/t5_1_1/xxl.gin}
RUN_GIN=${RUN_GIN:-gin/runs/uptrain.gin}
NUM_KV_HEADS=${NUM_KV_HEADS:-8}
NUM_PARTITIONS=${NUM_PARTITIONS:-1}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
GCLOUD=(gcloud compute tpus tpu-vm --project="${PROJECT}" --zone="${ZONE}")
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${SETUP:-0}" == "1" ]]; then
  echo "Copying ${REPO_ROOT} to ${TPU_NAME}:${REMOTE_DIR} on all workers ..."
  "${GCLOUD[@]}" ssh "${TPU_NAME}" --worker=all --command="mkdir -p ${REMOTE_DIR}"
  "${GCLOUD[@]}" scp --recurse --worker=all "${REPO_ROOT}/." "${TPU_NAME}:${REMOTE_DIR}"
  "${GCLOUD[@]}" ssh "${TPU_NAME}" --worker=all --command="cd ${REMOTE_DIR} && \
    pip install -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
    pip install -e ."
fi

FLAGS=(
  "--gin_file=${MODEL_GIN}"
  "--gin_file=${RUN_GIN}"
  "--gin.MODEL_DIR=\\\"${MODEL_DIR}\\\""
  "--gin.INITIAL_CHECKPOINT_PATH=\\\"${INIT_CKPT}\\\""
  "--gin.NUM_KV_HEADS=${NUM_KV_HEADS}"
  "--gin.NUM_PARTITIONS=${NUM_PARTITIONS}"
  "--run_mode=train"
  "--multi_host"
)
if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
  FLAGS+=("--tfds_data_dir=${TFDS_DATA_DIR}")
fi
if [[ -n "${DATA_CACHE_DIR:-}" ]]; then
  FLAGS+=("--gin.DATA_CACHE_DIR=\\\"${DATA_CACHE_DIR}\\\"")
fi
FLAGS+=("${EXTRA_FLAGS[@]}")

# The same command on every worker; logs stay on each worker. Exit status 75
# (preempted after saving) relaunches the worker; anything else ends it.
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART_DELAY_S=${RESTART_DELAY_S:-10}
RUN="python3 -m gqa_t5x.main ${FLAGS[*]} 2>&1 | (trap '' TERM INT; tee -a ~/gqa_t5x_train.log)"
COMMAND="cd ${REMOTE_DIR} && set -o pipefail && for attempt in \$(seq 0 ${MAX_RESTARTS}); do \
  status=0; ${RUN} || status=\$?; \
  if [ \$status -ne 75 ]; then exit \$status; fi; \
  echo \"preempted (exit 75): relaunch \$((attempt + 1)) of ${MAX_RESTARTS}\"; sleep ${RESTART_DELAY_S}; \
done; exit 75"
echo "Launching on all workers of ${TPU_NAME}:"
echo "  ${COMMAND}"
exec "${GCLOUD[@]}" ssh "${TPU_NAME}" --worker=all --command="${COMMAND}"
