#!/usr/bin/env bash
# megatune eval vs lm-evaluation-harness 0.4.13 on the GPU machine: MMLU (57 subjects, 14042 questions) and ARC
# (Challenge + Easy, 3548) on a Qwen2-1.5B-shaped checkpoint with RANDOM weights built from a config (speed only;
# the tiny test tokenizer stands in for Qwen's, no hub access), bf16, both protocols, same requests on both sides.
#
# 1. here (network):   bash packages/evaluate/benchmarks/gpu_eval.sh --prepare
#    puts lm-eval's wheels and its import-time dependencies (py3.12, manylinux) and the MMLU/ARC files under
#    bench_out/evaluate/ (git-ignored, about 21 MB)
# 2. GPU machine:      bash packages/evaluate/benchmarks/gpu_eval.sh [loglikelihood|native]   (carry: bench_out/evaluate)
#    installs lm-eval's wheels into /tmp/lmeval/site over the system's torch/transformers (--no-deps, --no-index),
#    runs bench_eval.py for each protocol asked (default both: loglikelihood, then Native generation with 16 new
#    tokens; 1x H200: about 6 and 7 min) and writes Markdown + JSON figures to $OUT (or bench_out/evaluate/results).
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=bench_out/evaluate
WHEELS="lm-eval==0.4.13 accelerate==1.15.0 psutil requests urllib3 certifi charset-normalizer idna chardet dill"

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$HERE/whl" "$HERE/data"
    # shellcheck disable=SC2086
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$HERE/whl" $WHEELS
    cp -r "${MEGATUNE_EVAL_DATA:-../shared/data}/mmlu" "${MEGATUNE_EVAL_DATA:-../shared/data}/arc" "$HERE/data/"
    du -sh "$HERE"
    exit 0
fi

OUT_DIR=${OUT:-$HERE/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
# lm-eval's wheels in a folder of their own, put in front of the system's packages by a small launcher (a virtualenv
# with --system-site-packages would not see packages the system python finds through its own environment)
"$PY" -m pip install --quiet --no-index --no-deps --target /tmp/lmeval/site "$HERE"/whl/*.whl
mkdir -p /tmp/lmeval/bin
printf '#!/bin/sh\nPYTHONPATH=/tmp/lmeval/site${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' "$(command -v "$PY")" \
    > /tmp/lmeval/bin/python
chmod +x /tmp/lmeval/bin/python
export PYTHONPATH=packages/evaluate/src:packages/convert/src:packages/argmap/src
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
COMMON=(--model qwen2-1.5b --datasets mmlu arc:challenge,easy --data_dir "$HERE/data"
        --lmeval_python /tmp/lmeval/bin/python)
for protocol in ${1:-loglikelihood native}; do
    case "$protocol" in
        loglikelihood) extra=(--batch_size 32) ;;
        native) extra=(--batch_size 128 --max_new_tokens 16) ;;
        *) echo "gpu_eval.sh: error: unknown protocol $protocol; use loglikelihood or native" >&2; exit 2 ;;
    esac
    "$PY" packages/evaluate/benchmarks/bench_eval.py "${COMMON[@]}" --protocols "$protocol" "${extra[@]}" \
        --out "$OUT_DIR/$protocol.json" | tee "$OUT_DIR/$protocol.md"
done
