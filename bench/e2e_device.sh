#!/usr/bin/env bash
# The sparse-stage measurements on a lent H200 in one call (carry .sparse_whl and .whl2). Run from the repo root:
#   bash bench/e2e_device.sh STEP...
# Steps, run in the order given, each under its own time limit, all output teed to $OUT/e2e.log and JSON lines
# appended to $OUT/e2e.jsonl:
#   tests          the GPU tests of the kernels and of the bf16 model
#   dense_kernels  bench/dense_attention.py (torch flash vs cuDNN, GLM-5 and DeepSeek-V3.2 layers, 8K to 128K)
#   backward       bench/e2e.py --backward (sparse attention: reference vs Triton backward, 8K and 32K)
#   profile        GLM-5 dense (the default kernel, then flash) and sparse steps at 32K, each with its top kernels
#   table          GLM-5 and DeepSeek-V3.2, dense and sparse, 8K to 128K (the table)
#   train_base     the sparse stage with the base training, GLM-5, 8K and 32K; then with activation checkpointing,
#                  32K and 64K
#   long           GLM-5 sparse at 128K and 256K, dense at 256K (peak memory)
#   tests_cp       the GPU tests of the context-parallel pieces, the scorer's tiles, the bf16 model, the fused loss
#   cp1            GLM-5 dense and sparse at 32K: the f58aa06 baseline (a `git archive` copy in .e2e_base, carried)
#                  and this tree one after the other (this tree with a profiled step)
#   topk           bench/topk.py: the top-k's parts, the candidate filter, the scorer's tiles, GLM-5, 32K and 128K
#   topk_filter    GLM-5 sparse steps at 128K without and with the top-k's candidate filter (every 16th key)
#   anchor         bench/sparse_anchor.py, 64 heads: the sparse forward, teacher pass and backward beside TileLang's
#                  example (carry .tl, see NOTES v9); anchor128: the forward at 128 heads (DeepSeek-V3.2); anchor_pipelined:
#                  the FlashMLA-style example at 8K
#   tests_sparse   the GPU tests of the sparse kernels alone
# Wheels: .sparse_whl (deepspeed 0.19.8, transformers 5.23.0, pydantic, hjson), .whl2 (hydra-core, omegaconf,
# antlr4, datasets, ...); torch 2.11 and triton 3.6 are the image's.
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# The wheels travel in .sparse_whl and .whl2, or (for `anchor` and `topk`, with TileLang) in .tl: TileLang 0.1.15
# and its needs unpacked into a tar.xz (tl_site.tar.xz, 46 MB: the wheels would not fit one call), the transformers
# wheel, and the TileLang examples.
if [ -d .sparse_whl ] && [ ! -d /tmp/e2e_site/transformers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/e2e_site \
    .sparse_whl/*.whl .whl2/*.whl || exit 1
fi
if [ -f .tl/tl_site.tar.xz ] && [ ! -d /tmp/tls/site ]; then
  mkdir -p /tmp/tls && tar -xJf .tl/tl_site.tar.xz -C /tmp/tls || exit 1
  if compgen -G ".tl/transformers-*.whl" >/dev/null; then  # .tl alone: it brings its own transformers
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/e2e_site .tl/transformers-*.whl || exit 1
  fi
fi
export PYTHONPATH=/tmp/e2e_site:$PWD
LOG=$OUT/e2e.log JSON=$OUT/e2e.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
step() {  # step LIMIT_S COMMAND...
  local limit=$1; shift
  echo "== $(date +%T) $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
for name in "$@"; do
  case "$name" in
  tests) step 240 python3 -m pytest -q -p no:cacheprovider tests/test_sparse_gpu.py tests/test_model_gpu.py ;;
  dense_kernels) step 150 python3 bench/dense_attention.py --lengths 8192 32768 131072 --out "$JSON" ;;
  backward) step 180 python3 bench/e2e.py --backward --lengths 8192 32768 --out "$JSON" ;;
  profile)
    step 150 python3 bench/e2e.py --stages dense sparse --lengths 32768 --profile --out "$JSON"
    step 90 python3 bench/e2e.py --stages dense --lengths 32768 --dense-kernel flash --profile --out "$JSON" ;;
  table)
    step 300 python3 bench/e2e.py --lengths 8192 32768 65536 131072 --out "$JSON"
    step 200 python3 bench/e2e.py --shape dsv32 --lengths 8192 32768 --out "$JSON" ;;
  train_base)
    step 150 python3 bench/e2e.py --stages sparse --train-base --lengths 8192 32768 --out "$JSON"
    step 150 python3 bench/e2e.py --stages sparse --train-base --activation-checkpointing --lengths 32768 65536 \
      --out "$JSON" ;;
  long)
    step 120 python3 bench/e2e.py --stages sparse --lengths 131072 262144 --out "$JSON"
    step 200 python3 bench/e2e.py --stages dense --lengths 262144 --steps 1 --out "$JSON" ;;
  tests_cp)
    step 130 python3 -m pytest -v -p no:cacheprovider tests/test_context_parallel_gpu.py \
      tests/test_sparse_gpu.py::test_triton_scorer_tiles_give_the_float32_scores \
      tests/test_sparse_gpu.py::test_triton_index_scores_match_the_float32_scorer_and_pick_the_same_topk \
      tests/test_model_gpu.py tests/test_losses_gpu.py \
      tests/test_sparse_gpu.py::test_triton_sparse_backward_matches_the_reference_backward ;;
  cp1)
    step 100 env PYTHONPATH=/tmp/e2e_site python3 .e2e_base/bench/e2e.py --stages dense sparse --lengths 32768 \
      --out "$OUT/cp1_base.jsonl"
    step 100 python3 bench/e2e.py --stages dense sparse --lengths 32768 --profile --out "$OUT/cp1_tree.jsonl" ;;
  topk) step 120 python3 bench/topk.py --out "$JSON" ;;
  topk_filter)
    step 150 python3 bench/e2e.py --stages sparse --lengths 131072 --out "$JSON"
    step 150 python3 bench/e2e.py --stages sparse --lengths 131072 --topk-filter 16 --out "$JSON" ;;
  anchor) step 300 env PYTHONPATH="/tmp/tls/site:$PYTHONPATH" python3 bench/sparse_anchor.py --lengths 32768 --heads 64 \
      --anchors .tl/tl_sparse_mla_fwd.py \
      --backward-anchor .tl/tl_sparse_mla_bwd.py .tl/tl_sparse_mla_fwd.py --out "$JSON" ;;
  anchor128) step 200 env PYTHONPATH="/tmp/tls/site:$PYTHONPATH" python3 bench/sparse_anchor.py --lengths 32768 \
      --heads 128 --anchors .tl/tl_sparse_mla_fwd.py --out "$JSON" ;;
  anchor_pipelined) step 100 env PYTHONPATH="/tmp/tls/site:$PYTHONPATH" python3 bench/sparse_anchor.py --lengths 8192 \
      --heads 64 --anchors .tl/tl_sparse_mla_fwd_pipelined.py --out "$JSON" ;;  # did not return at 32K (NOTES v9)
  tests_sparse) step 160 python3 -m pytest -q -p no:cacheprovider tests/test_sparse_gpu.py ;;
  *) echo "unknown step $name" | tee -a "$LOG"; exit 2 ;;
  esac
done
