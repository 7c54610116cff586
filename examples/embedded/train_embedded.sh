#!/usr/bin/env bash
# Reproduce flowtame/assets/glow-digits.safetensors, the embedded default model (embedded:glow-digits):
# a small Glow (16x16 grayscale, 5 bits, additive coupling, LU 1x1 convolutions) trained on the training split
# of the embedded digits, then its train and test BPD.
#
# Usage: examples/embedded/train_embedded.sh [OUTPUT]   (default: flowtame/assets/glow-digits.safetensors)
# One CPU thread, so a run gives the same weights bit for bit on the same kind of CPU; about 15-20 minutes on
# two shared cores. Sample grids (temperature 0.7) go to build/glow-digits-samples/.
set -euo pipefail

cd "$(dirname "$0")/../.."
OUTPUT="${1:-flowtame/assets/glow-digits.safetensors}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

flowtame train embedded:digits:train -o "$OUTPUT" --force \
    --arch glow --image-size 16 --channels 1 --n-bits 5 \
    --n-flow 8 --n-block 2 --hidden 128 --additive --lu \
    --steps 2500 --batch-size 32 --lr 1e-3 --warmup 200 --decay 1000 --grad-clip 50 --seed 0 --device cpu \
    --sample-every 500 --sample-dir build/glow-digits-samples

# The resumable state is only needed to continue training; it does not ship.
rm -f "$OUTPUT.resume.safetensors"

python - "$OUTPUT" <<'EOF'
import sys

from flowtame.io.checkpoint import load_checkpoint
from flowtame.data.images import open_images
from flowtame.likelihood.nll import compute_nll

ckpt = load_checkpoint(sys.argv[1])
for split in ("train", "test"):
    result = compute_nll(ckpt.model, open_images(f"embedded:digits:{split}", ckpt.data_spec), seed=0, device="cpu")
    print(f"{split}: n={len(result)}  mean BPD {result.bpd.mean():.4f}  sd {result.bpd.std(ddof=1):.4f}")
EOF
