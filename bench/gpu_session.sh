#!/bin/bash
# One GPU session's checks (device time is scarce): the kernels' tests on CUDA, then the FFN and decode benches with
# CUDA graphs. Results go to $OUT (the device tool's folder) or bench/results/. A step that fails is reported and
# the next one runs. In two parts, each inside a device command's 10 minutes (teal's about 7, the bricks' about 2:
# estimates from the H200 session's step times, the probe and the predicated A/B not timed there); no argument runs
# both.
#
#     bash bench/gpu_session.sh [teal|bricks]    # from the repository root, on a machine with a CUDA GPU
PART=${1:-all}
OUTDIR=${OUT:-bench/results}
TAG=${TAG:-$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")}
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the machine lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
exec > >(tee -a "$OUTDIR/gpu_session_${TAG}_$PART.log") 2>&1  # the steps' output and times, kept with the results
step() { echo "=== $1"; shift; local t=$SECONDS; "$@"; echo "=== rc $? in $((SECONDS - t)) s"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
FFN="timeout 150 python3 bench/bench_ffn.py --device cuda --busy 0 --batch 1 --batch 32 --active 0.5 --active 0.25"
DEC="timeout 240 python3 bench/bench_decode.py --device cuda --dtype bfloat16 --layers 32 --hidden 4096 --d-ff 11008 \
  --heads 32 --kv-heads 32 --tokens 128 --active 0.5"

if [ "$PART" != bricks ]; then
  step tests timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
  # teal's kernel, each design (predicated, gathered) alone, per projection of the 7B shape, at kept shares 0-1.
  step kernel-probe sh -c "timeout 150 python3 bench/kernel_probe.py | tee $OUTDIR/kernel_probe_designs_$TAG.txt"
  step ffn-teal-threshold $FFN --router teal --selection threshold --shape 4096x11008 --shape 576x1536 \
    --dtype bfloat16 --dtype float16 --json $OUTDIR/ffn_teal_threshold_$TAG.json
  step decode-teal-threshold $DEC --router teal --selection threshold --json $OUTDIR/decode_teal_threshold_7b_$TAG.json
  # The FFN with the design fixed to the predicated one (the rows above name the design each projection took).
  step ffn-teal-predicated env BRICKS_TRITON_ROWS=predicated $FFN --router teal --selection threshold \
    --shape 4096x11008 --dtype bfloat16 --json $OUTDIR/ffn_teal_threshold_predicated_$TAG.json
  step ffn-teal-topk $FFN --router teal --shape 4096x11008 --dtype bfloat16 --json $OUTDIR/ffn_teal_topk_$TAG.json
  step decode-teal-topk $DEC --router teal --json $OUTDIR/decode_teal_topk_7b_$TAG.json
  # Batches under --dense-fallback run `dense` off the CPU (`RoutedFFN.untimed_path`): the batch of 32 should be ~1.0x.
  step ffn-teal-fallback timeout 150 python3 bench/bench_ffn.py --device cuda --busy 0 --batch 8 --batch 32 \
    --active 0.5 --router teal --selection threshold --dense-fallback --shape 4096x11008 --dtype bfloat16 \
    --json $OUTDIR/ffn_teal_fallback_$TAG.json
fi
if [ "$PART" != teal ]; then
  step decode-bricks $DEC --router centroid --json $OUTDIR/decode_centroid_7b_$TAG.json
  # The bricks' decode token on its triton kernel (the static path since the 2026-12-02 session), batches grouped;
  # then the grouped GEMMs at batch 1 too, and every brick masked, for the comparison.
  step ffn-bricks $FFN --router centroid --shape 4096x11008 --dtype bfloat16 --json $OUTDIR/ffn_centroid_triton_$TAG.json
  step ffn-bricks-grouped $FFN --router centroid --shape 4096x11008 --dtype bfloat16 --path grouped \
    --json $OUTDIR/ffn_centroid_grouped_$TAG.json
  step ffn-bricks-masked $FFN --router centroid --shape 4096x11008 --dtype bfloat16 --path masked \
    --json $OUTDIR/ffn_centroid_masked_$TAG.json
  step ffn-bricks-fallback timeout 150 python3 bench/bench_ffn.py --device cuda --busy 0 --batch 8 --batch 32 \
    --active 0.5 --router centroid --dense-fallback --shape 4096x11008 --dtype bfloat16 \
    --json $OUTDIR/ffn_centroid_fallback_$TAG.json
fi
