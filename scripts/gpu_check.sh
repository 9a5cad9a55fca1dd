#!/usr/bin/env bash
# One prepared GPU session (the lent machine has torch, timm, scikit-learn but no Ray: the engine runs
# without it). Writes logs to $OUT (or ./gpu_out). Usage: bash scripts/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
# 1. Engine vs bare loop, ImageNet-sized: ResNet-50, 224 px, bf16, channels_last.
timeout 240 python3 scripts/bench_engine.py --device cuda --backbone resnet50 --image-size 224 --batch-size 128 \
  --amp bf16 --channels-last --loader-workers 8 --steps 60 --warmup 15 --images 2048 2>&1 | tee "$OUT/bench_resnet50.txt"
# 2. MedMNIST-sized: ResNet-18 (28) stem, 28 px, batch 128 — the loader's per-sample cost shows here.
timeout 120 python3 scripts/bench_engine.py --device cuda --backbone resnet18_28 --image-size 28 --batch-size 128 \
  --amp bf16 --loader-workers 4 --steps 150 --warmup 20 --images 4096 2>&1 | tee "$OUT/bench_resnet18_28.txt"
# 3. The whole run path on CUDA (bf16 autocast, checkpoints, eval) on demo data, without Ray.
timeout 180 python3 - <<'PY' 2>&1 | tee "$OUT/run_training_cuda.txt"
import tempfile, time
from semimed.config import load_config
from semimed.data.demo import write_demo
from semimed.experiment import run_training
tmp = tempfile.mkdtemp()
root = write_demo(tmp + "/data")["breakhis"]
cfg = load_config(None, [f"data.root={root}", "data.image_size=64", "data.fraction=0.5", "model.backbone=resnet18",
                         "train.steps=300", "train.batch_size=64", "train.amp=bf16", "train.eval_every=100",
                         f"data.cache_dir={tmp}/cache", "train.channels_last=true"])
start = time.time()
final = run_training(cfg, tmp + "/run", show_progress=False)
print(f"cuda run_training: {time.time() - start:.1f} s; test/accuracy {final['test/accuracy']:.3f} "
      f"test/roc_auc {final['test/roc_auc']:.3f} images/s {final.get('train/images_per_s', float('nan')):.0f}")
PY
