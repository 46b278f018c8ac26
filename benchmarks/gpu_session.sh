#!/usr/bin/env bash
# Every GPU measurement issues 11 and 12 ask for, in one command on a lent GPU machine
# (see ../shared/docs/gpu.md: the project, the wheels and CIFAR-10 travel under .device/).
# The steps run in priority order, each bounded by `timeout`, so that a step that hangs or
# fails costs only its own slot; after each, every results file so far is packed into
# $OUT/results.tar and the log into $OUT/log.txt. `nvidia-smi dmon` records SM use.
#
#   bash benchmarks/gpu_session.sh                       # on the GPU machine
#   SMALL=0 DATA=../shared/data/cifar10 bash benchmarks/gpu_session.sh --device cpu --steps 3 --warmup 1 \
#       --classes 0-1 --shots 64                          # a dry run of every step here (CPU)
#
# Extra arguments go to every throughput.py call. Environment: OUT (default /tmp/gpu-out),
# DATA (default .device/data/cifar10), SMALL=0 skips the 60 + 60-epoch small run, and
# T_RUN T_MINING T_HOST T_MICRO T_224 T_MAIN T_SYNC T_512 T_COMPILE T_COMPILE_RANDOM T_CL T_CACHE T_DECODE
# T_LOADER set each step's time limit in seconds
# (together more than one 600 s command: the last steps run only when the first finish early).
# T_C100 > 0 first runs issue 10's converging CIFAR-100 comparison (`cifar100.py --budget gpu`, needs
# .device/data/cifar100; about 3 minutes per seed) for that many seconds, and T_B512ACC > 0 issue 11's
# batch 512 against 128 on all 450 images per class (`--budget gpu_batch`, about 8 minutes); their records
# and tables come back in $OUT/c100-<budget>.tar. Both are off by default: with the other steps they do not
# fit one session's 15 minutes: T_C100=480 packs its results before the 600 s command limit stops the
# steps after it (or set their T_ to 1).
set -u
OUT=${OUT:-/tmp/gpu-out}
DATA=${DATA:-.device/data/cifar10}
RES=$(mktemp -d /tmp/gpu-res.XXXX)
mkdir -p "$OUT"
LOG="$OUT/log.txt"

step() {  # step LIMIT_S NAME ARGS...: one throughput.py call, its results under $RES/NAME
    local limit=$1 name=$2
    shift 2
    echo "== $(date +%T) $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" python3 benchmarks/throughput.py --dataset "$DATA" --out "$RES/$name" "$@" 2>&1 | tee -a "$LOG"
    echo "== $(date +%T) $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
    tar cf "$OUT/results.tar" -C "$RES" .
}

micro() {  # micro LIMIT_S NAME SCRIPT ARGS...: a small benchmark script, its results under $RES/NAME
    local limit=$1 name=$2 script=$3
    shift 3
    echo "== $(date +%T) $name (limit ${limit}s): $script $*" | tee -a "$LOG"
    timeout "$limit" python3 "benchmarks/$script" --out "$RES/$name" "$@" 2>&1 | tee -a "$LOG"
    echo "== $(date +%T) $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
    tar cf "$OUT/results.tar" -C "$RES" .
}

if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
    nvidia-smi dmon -s u -o T -d 1 > "$OUT/dmon.txt" 2>&1 &
fi
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

c100() {  # c100 LIMIT_S BUDGET: cifar100.py's budget for that long, then the report of whatever finished
    [ "$1" -gt 0 ] || return 0
    echo "== $(date +%T) cifar100 $2 (limit $1s)" | tee -a "$LOG"
    timeout "$1" python3 benchmarks/cifar100.py --budget "$2" --dataset .device/data/cifar100 --cache /tmp/c100 \
        --out "$RES/c100-$2" --threads 8 2>&1 | grep -v "^{'" | tee -a "$LOG"
    python3 benchmarks/cifar100.py --budget "$2" --cache /tmp/c100 --out "$RES/c100-$2" --report-only > /dev/null 2>&1
    tar cf "$OUT/c100-$2.tar" -C /tmp/c100 "records-$2.jsonl" -C "$RES" "c100-$2"
}
c100 "${T_C100:-0}" gpu
c100 "${T_B512ACC:-0}" gpu_batch

BF16=--bf16
SMALL_RUN=--small_run
[ "${SMALL:-1}" = 0 ] && SMALL_RUN=
# In priority order for the next lent GPU (the rows measured before come after the open questions):
# 1. issue 12 item 4: a whole run (evaluations, last batches, export) eager and with CUDA graphs, which
#    decides whether reduce-overhead becomes the default on CUDA
step "${T_RUN:-240}" compile_run $BF16 --compile_run reduce-overhead "$@"
# 1b. issue 12 item 2: stage 1's tuple loss in fixed shapes (no host read-back, the default on a GPU) against
#     its pairs listed (7 syncs per step before): the loss alone, then stage 1 through the pipeline both ways
micro "${T_MINING:-40}" losses_cuda losses.py --device cuda --batches 128 512 1024 --classes 100 10
step "${T_MINING:-40}" stage1_mining $BF16 --methods stage1 stage1-listed --paths device --steps 120 --warmup 20 "$@"
# 2. issue 12: the host's work per step that the pipeline adds (a model with almost no compute)
step "${T_HOST:-90}" host_overhead $BF16 --host_overhead --batch 128 --steps 200 --warmup 30 --repeats 2 "$@"
# 2b. issue 12 item 2: the teacher's forward under no_grad against inference_mode (host-bound at batch 128
#     on a GPU), and the device path's augmentation per batch (previous indexing against the gather)
micro "${T_MICRO:-30}" teacher_forward teacher_forward.py --batches 16 128 --calls 50
micro "${T_MICRO:-30}" augmentation augmentation.py --repeats 100
micro "${T_MICRO:-30}" imagenet_transforms imagenet_transforms.py --batches 16 128 256 --repeats 10
# 2c. issue 12 item 1: inputs over 64 px (timm's random-resized crop and colour jitter): device path, 8 workers
#     and the bare loop at 224 px
step "${T_224:-90}" imagenet224 $BF16 --image_size 224 --methods ce stage1 --workers 8 --steps 30 --warmup 8 "$@"
# 3. issue 12's table: every method, both data paths against the bare loop, batch 128; the small run
step "${T_MAIN:-150}" b128 $BF16 --workers 8 --steps 60 --warmup 10 $SMALL_RUN "$@"
# 4. issue 12 item 2: host-device syncs per training step, and where
step "${T_SYNC:-60}" syncs $BF16 --sync_rows --steps 30 --warmup 10 "$@"
# 5. issue 11: batch 512 against the bare loop at 512 (the throughput gain of large batches)
step "${T_512:-45}" b512 $BF16 --batch 512 --paths device --methods ce kd stage1 stage2 --steps 30 --warmup 8 "$@"
# 6. issue 12 item 4: torch.compile modes (each row pays its own compile)
step "${T_COMPILE:-200}" compile $BF16 --compile_modes default reduce-overhead --methods ce stage1 stage2 --steps 100 --warmup 20 "$@"
# 6b. dropout under torch.compile: inductor's own masks (what --torch_compile does) against eager's random kernels
#     (fallback_random, the eager run's masks): what the speed of CUDA graphs owes to inductor's own draws
micro "${T_COMPILE_RANDOM:-90}" compile_random compile_random.py --mode reduce-overhead --steps 50
# 7. issue 12 item 2: channels-last, pipeline and bare loop
step "${T_CL:-50}" channels_last $BF16 --channels_last_rows --methods ce stage1 stage2 --steps 60 --warmup 10 "$@"
# 8. issue 11 item 3: the teacher cache's build and its stage-1 saving
step "${T_CACHE:-40}" teacher_cache $BF16 --only_teacher_cache --cache_shots 20 --steps 60 --warmup 10 "$@"
# 9. the decode-check of a data set of photos at start-up on a many-core machine: one process against the
#    pool of decoding processes (CPU work; this machine's 16 cores against the development machine's 2)
micro "${T_DECODE:-90}" decoding decoding.py --rounds 1
# 10. the worker path's loading at 224 px by DataLoader workers (0: the default before 2026-12-06; 8: the
#     default now on this machine), against accelerator steps of 0, 50 and 200 ms (host work; 16 cores)
micro "${T_LOADER:-120}" loader_workers loader_workers.py --workers 0 1 4 8 --step_ms 0 50 200
echo "== $(date +%T) done" | tee -a "$LOG"
