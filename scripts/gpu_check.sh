#!/usr/bin/env bash
# One prepared GPU session, ~8 minutes: the throughput benchmarks of issue 15 (scripts/gpu_bench.py: engine vs
# bare loop eager and compiled, the data path on the device at 224 px, FixMatch step with device vs loader views,
# 4 packed MedMNIST trials vs 1, DenseNet-121 @224), then the whole run path on CUDA. The lent machine has torch,
# timm and scikit-learn but no Ray: everything runs the engine directly. Writes $OUT/gpu_bench.json and logs
# (OUT defaults to ./gpu_out). Usage: bash scripts/gpu_check.sh [--smoke-test]   (smoke: tiny, on the CPU)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ "${1:-}" = "--smoke-test" ]; then
  timeout 300 "$PY" scripts/gpu_bench.py --smoke-test --out "$OUT" 2>&1 | tee "$OUT/gpu_bench_smoke.txt"
  exit "${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
# 1. The benchmarks: each piece adds its numbers to $OUT/gpu_bench.json when it ends; pieces that would start
#    after 380 s are skipped (recorded as such), and the whole step is cut at 450 s.
timeout 450 "$PY" scripts/gpu_bench.py --out "$OUT" --budget-s 380 2>&1 | tee "$OUT/gpu_bench.txt"
# 2. The whole run path on CUDA (bf16 autocast, channels_last, checkpoints, eval) on demo data, without Ray.
timeout 60 "$PY" - <<'PY' 2>&1 | tee "$OUT/run_training_cuda.txt"
import tempfile, time
from semimed.config import load_config
from semimed.data.demo import write_demo
from semimed.experiment import run_training
tmp = tempfile.mkdtemp()
root = write_demo(tmp + "/data")["breakhis"]
cfg = load_config(None, [f"data.root={root}", "data.image_size=64", "data.fraction=0.5", "model.backbone=resnet18",
                         "train.steps=200", "train.batch_size=64", "train.amp=bf16", "train.eval_every=100",
                         f"data.cache_dir={tmp}/cache", "train.channels_last=true"])
start = time.time()
final = run_training(cfg, tmp + "/run", show_progress=False)
print(f"cuda run_training: {time.time() - start:.1f} s; test/accuracy {final['test/accuracy']:.3f} "
      f"test/roc_auc {final['test/roc_auc']:.3f} images/s {final.get('train/images_per_s', float('nan')):.0f}")
PY
