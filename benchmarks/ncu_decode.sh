#!/usr/bin/env bash
# ncu of the split-KV decode kernel on an fp8 and a bf16 cache (W4's and W1's decode shapes), and its SASS: where
# the fp8 kernel's time goes (issue 18: it reads fp8 at ~3.0 TB/s on W4's shape, bf16 at ~4.2). Unmeasured guess
# to settle: conversions (cvt.rn.f16x2.e4m3x2) and mma.sync with 14 of BLOCK_M's 16 rows padding for a GQA group of 2.
#     (on the GPU machine, from the repository root)  OUT=/some/dir bash benchmarks/ncu_decode.sh
R=$PWD; export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=$R
OUT=${OUT:-/tmp/ncu_decode}; mkdir -p "$OUT"
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
S="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats
   --section Occupancy --section LaunchStats --section InstructionStats --section SchedulerStats"
for shape in "W4 decode" "W1 decode 256"; do
  for cache in fp8 bf16; do
    echo "##### $shape $cache" | tee -a "$OUT/ncu.txt"
    timeout 200 "$NCU" --clock-control none --target-processes all --kernel-name regex:decode_partition \
      --launch-skip 2 --launch-count 1 $S \
      python3 benchmarks/fp8_decode_variants.py --profile "$shape" --caches $cache 2>&1 | grep -v "^==PROF==" |
      tee -a "$OUT/ncu.txt" | grep -E "Duration|Throughput|Pipe|Issue Slots|Stall|Occupancy|Registers|Shared Memory|Executed Ipc|Warp Cycles" | head -40
  done
done
i=0
for c in ~/.triton/cache/*/decode_partition_kernel.cubin; do
  [ -f "$c" ] || continue
  i=$((i+1)); cuobjdump --dump-sass "$c" > "$OUT/sass$i.txt" 2>&1
  echo "sass$i.txt: $(grep -c '' "$OUT/sass$i.txt") lines, $(grep -c 'F2FP\|HMMA\|LDS' "$OUT/sass$i.txt") F2FP/HMMA/LDS"
done
