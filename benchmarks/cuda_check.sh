#!/bin/bash
# GPU checks of the CUDA path (paged attention, CUDA graphs), in one call:
# the CUDA tests, then throughput with CUDA graphs and eager (benchmarks/gpu_throughput.py).
#   bash benchmarks/cuda_check.sh            # NSEQ=256 MAXLEN=1024; the log also goes to $OUT (or /tmp)
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton; import levante.layers.paged_attention as p; print('torch', torch.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name(), '| triton paged kernel:', p.triton_paged_attention_available())"
tests=tests/test_paged_attention.py
[ -f tests/test_triton_attention.py ] && tests="$tests tests/test_triton_attention.py"
timeout ${TEST_S:-180} python3 -m pytest -q -x -p no:cacheprovider $tests 2>&1 | tail -15
timeout ${BENCH_S:-420} python3 benchmarks/gpu_throughput.py --num-seqs ${NSEQ:-256} --max-len ${MAXLEN:-1024} \
    $BENCH_ARGS 2>&1 | grep -v "it/s]" | tee ${OUT:-/tmp}/gpu_throughput.log
