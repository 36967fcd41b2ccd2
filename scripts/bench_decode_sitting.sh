#!/usr/bin/env bash
# One sitting of the decode benchmarks: the code before the speed work and
# this checkout, same shapes, back to back on the same machine, then the
# before/after tables (docs/bench_decode_compare_*.md) and the output-length
# check (large-like at 512 output tokens vs 128), and large-like with the model
# split over two CPU devices.
#
#   git worktree add --detach /tmp/before c63bda8      # the last commit before the speed work
#   bash scripts/bench_decode_sitting.sh /tmp/before
#
# About 28 minutes on a 2-core machine. Run it on an otherwise idle machine:
# every report records the load average at its start and end.
set -euo pipefail
BEFORE=$(cd "${1:?usage: bench_decode_sitting.sh BEFORE_CHECKOUT}" && pwd)
cd "$(dirname "$0")/.."
AFTER=$(pwd)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} TF_CPP_MIN_LOG_LEVEL=3
TMP=${TMPDIR:-/tmp}/bench_sitting
mkdir -p "$TMP"

LARGE=(--gin_file gin/models/t5_1_1/large.gin --num_encoder_layers 4 --num_decoder_layers 4
       --input_length 512 --batch_size 16 --label "large-like (T5.1.1-large width, 4+4 layers)")
XXL=(--gin_file gin/models/t5_1_1/xxl.gin --num_encoder_layers 2 --num_decoder_layers 2
     --input_length 512 --output_length 64 --batch_size 8 --label "XXL-like (T5.1.1-XXL width, 2+2 layers)")

# The old flat layout's entry point (python -m gqa_t5x.benchmark), run from its own checkout.
before() { (cd "$BEFORE" && PYTHONPATH="$BEFORE" python -m gqa_t5x.benchmark "$@"); }
after() { PYTHONPATH="$AFTER" python -m gqa_t5x bench "$@"; }

before "${LARGE[@]}" --output_length 128 --num_kv_heads 1,8,16 --repeats 3 --huggingface_repeats 2 \
  --output "$TMP/before_large"
after "${LARGE[@]}" --output_length 128 --num_kv_heads 1,2,4,8,16 --repeats 3 --huggingface_repeats 2 \
  --output docs/bench_decode_large
before "${XXL[@]}" --num_kv_heads 1,8,64 --repeats 2 --huggingface_repeats 1 --output "$TMP/before_xxl"
after "${XXL[@]}" --num_kv_heads 1,8,64 --repeats 2 --huggingface_repeats 1 --output docs/bench_decode_xxl
# Output length 512: decoder time per token against the written cache bytes.
after "${LARGE[@]}" --output_length 512 --num_kv_heads 1,8,16 --repeats 1 --no_huggingface \
  --output docs/bench_decode_large_out512
# The model split over the two cores (two XLA CPU devices, num_partitions 2).
after "${LARGE[@]}" --output_length 128 --num_kv_heads 1,8,16 --repeats 3 --huggingface_repeats 1 \
  --cpu_devices 2 --num_partitions 2 --output docs/bench_decode_large_partitioned

python scripts/bench_compare.py --before "$TMP/before_large.json" --after docs/bench_decode_large.json \
  --longer docs/bench_decode_large_out512.json --out docs/bench_decode_compare_large.md
python scripts/bench_compare.py --before "$TMP/before_xxl.json" --after docs/bench_decode_xxl.json \
  --out docs/bench_decode_compare_xxl.md
cp "$TMP/before_large.json" docs/bench_decode_before_large.json
cp "$TMP/before_xxl.json" docs/bench_decode_before_xxl.json
