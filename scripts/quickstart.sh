#!/usr/bin/env bash
# Installs coatvit into .venv, trains coat_lite_tiny on the built-in dataset (no download), then predicts with the
# result on a few held-out built-in images. EPOCHS=N changes the length of the run (default 6 epochs of 100 steps,
# about 3.5 minutes on 2 CPU cores); THREADS=1 helps on a machine shared with other jobs (default: torch's choice).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-6}
THREADS_FLAG=${THREADS:+--threads $THREADS}
RUN=${RUN:-runs/quickstart}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[train]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/coatvit info coat_lite_tiny

# Small images and a light recipe (no mixup / RandAugment / EMA): the built-in shapes need minutes, not days.
rm -rf "$RUN"
.venv/bin/coatvit train --model coat_lite_tiny --img-size 32 --epochs "$EPOCHS" -b 32 --lr 1e-3 \
    --warmup-epochs 0.6 --no-aug --smoothing 0 --aug-repeats 1 --drop-path 0 --no-model-ema \
    --max-steps-per-epoch 100 --builtin-val-size 500 -j 1 $THREADS_FLAG \
    --output "$(dirname "$RUN")" --experiment "$(basename "$RUN")"

# A few held-out images of the built-in dataset, written as PNG files, then predicted from the best checkpoint.
.venv/bin/python - "$RUN/samples" <<'EOF'
import sys
from pathlib import Path
from coatvit.data import BUILTIN_CLASSES, BuiltinShapes

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
val = BuiltinShapes("val")
for i in range(8):
    image, label = val[i]
    image.save(out / f"{i}_{BUILTIN_CLASSES[label]}.png")
EOF
.venv/bin/coatvit predict "$RUN/samples" --weights "$RUN/best.pth" --topk 2
echo "run directory: $RUN (summary.csv, curves.png, best.pth, last.pth)"
