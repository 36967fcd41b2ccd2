#!/usr/bin/env bash
# Reproduces docs/bench_decode_*.{json,md,png} (greedy time per sample vs kv
# heads, with HuggingFace transformers T5 alongside). CPU-sized shapes: T5.1.1
# widths with fewer layers. Takes ~8 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} TF_CPP_MIN_LOG_LEVEL=3

# T5.1.1-large width (d_model 1024, 16 heads x 64, d_ff 2816), 4+4 layers.
gqa-t5x bench --gin_file gin/models/t5_1_1/large.gin \
  --num_encoder_layers 4 --num_decoder_layers 4 --num_kv_heads 1,2,4,8,16 \
  --input_length 512 --output_length 128 --batch_size 16 --repeats 3 --huggingface_repeats 2 \
  --label "large-like (T5.1.1-large width, 4+4 layers)" --output docs/bench_decode_large "$@"

# T5.1.1-XXL width (d_model 4096, 64 heads x 64, d_ff 10240), 2+2 layers.
gqa-t5x bench --gin_file gin/models/t5_1_1/xxl.gin \
  --num_encoder_layers 2 --num_decoder_layers 2 --num_kv_heads 1,8,64 \
  --input_length 512 --output_length 64 --batch_size 8 --repeats 2 --huggingface_repeats 1 \
  --label "XXL-like (T5.1.1-XXL width, 2+2 layers)" --output docs/bench_decode_xxl "$@"
