#!/usr/bin/env bash
# The GPU check, as one prepared script for a bare CUDA machine (results: one JSON, in minutes).
#
# Prepare here, once (the machine sees only the repository; .gpu/ is git-ignored and carried):
#   python benchmarks/subset.py /path/to/camvid-val .gpu/camvid-40 --images 40
#   cp pydensecrf2-1.1.tar.gz .gpu/wheels/           # the sdist: pip download --no-binary=:all: pydensecrf2==1.1
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu/wheels typer==0.29.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# Run there (Python 3.12 with torch and CUDA; pydensecrf is built from the carried sdist):
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Steps: install what is missing; the device-parametrised tests on CUDA; the torch CRF against
# pydensecrf on real CamVid unaries; the CRF alone in images/s (480x360 K=11, 640x480 K=7) with
# its fraction of the memory-traffic bound; refine --device cuda end to end (I/O included) on
# 2,000 CamVid-shaped ids; its masks against the CPU path's (pixels, mIoU). DEVICE=cpu QUICK=1 runs
# the same plumbing on a CPU, small, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dhr-gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
DATA=${DATA:-.gpu/camvid-40}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output and exit status
    local name=$1 limit=$2; shift 2
    log "start $name"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT/steps.jsonl"
    log "end $name rc=$rc ($((SECONDS - t0)) s)"
    tail -n 5 "$OUT/$name.log"
}
: > "$OUT/steps.jsonl"

# 1. What is missing (no network there): typer 0.29 and its needs as wheels, pydensecrf2 built.
site=/tmp/dhr-site
if ! $PY -c "import pydensecrf.densecrf, typer, threadpoolctl; assert tuple(map(int, typer.__version__.split('.')[:2])) >= (0, 29)" 2>/dev/null; then
    step install 240 bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --target $site .gpu/wheels/*.whl && \
        $PY -m pip install -q --no-index --no-deps --no-build-isolation --target $site .gpu/wheels/pydensecrf2-*.tar.gz"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
$PY - > "$OUT/machine.json" <<'PY'
import json, os, platform, torch
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cores": os.cpu_count()}))
PY
cat "$OUT/machine.json"

# 2. The device-parametrised tests, on the device.
step tests 200 $PY -m pytest -q -p no:cacheprovider --device "$DEVICE" tests/core/test_batched.py tests/core/crf tests/runtime/test_device.py

# 3. Agreement of the torch CRF with pydensecrf, both DHR passes, real unaries.
images=$([ "$QUICK" = 1 ] && echo 2 || echo 20)
step agreement 200 $PY benchmarks/crf_agreement.py "$DATA" --images "$images" --generated $([ "$QUICK" = 1 ] && echo 1 || echo 3) \
    --device "$DEVICE" --batch 8 --no-exact --json "$OUT/agreement.json"

# 4. The CRF alone: images/s and the fraction of the memory-traffic bound.
step crf_speed 150 $PY benchmarks/crf_speed.py --data "$DATA" --skip-cpu --json "$OUT/crf_speed.json"

# 5. refine end to end, I/O included: --device on 2,000 ids (50 links to each of 40 real images),
#    then masks of the device against the CPU path on the 40 real ones.
if [ "$QUICK" = 1 ]; then  # the plumbing on 3 images, twice listed
    $PY benchmarks/subset.py "$DATA" /tmp/dhr-small --images 3 2>> "$OUT/steps.log"
    DATA=/tmp/dhr-small
fi
repeat=$([ "$QUICK" = 1 ] && echo 2 || echo 50)
$PY benchmarks/subset.py "$DATA" /tmp/dhr-big --images 40 --repeat "$repeat" 2>> "$OUT/steps.log"
workers=$($PY -c "import os; print(max(1, len(os.sched_getaffinity(0)) - 1))")
step e2e_device 240 $PY -m dhr_label refine --cams /tmp/dhr-big/cams.h5 --feats /tmp/dhr-big/feats.h5 --classes camvid \
    --out /tmp/dhr-e2e-device --device "$DEVICE" --crf-backend torch -j "$workers" --overwrite --json \
    $([ "$DEVICE" = cuda ] && echo --batch-pixels 16777216)  # ~100 images a batch (~25 GB): an H200 holds it
step e2e_cpu 240 $PY -m dhr_label refine --cams "$DATA/cams.h5" --feats "$DATA/feats.h5" --classes camvid \
    --out /tmp/dhr-e2e-cpu -j "$workers" --overwrite --json
step score_device 60 $PY -m dhr_label score --pred /tmp/dhr-e2e-device --gt "$DATA/gt" --classes camvid --json
step score_cpu 60 $PY -m dhr_label score --pred /tmp/dhr-e2e-cpu --gt "$DATA/gt" --classes camvid --json
$PY - "$OUT" "$DATA" > "$OUT/e2e_agreement.json" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
out, data = Path(sys.argv[1]), Path(sys.argv[2])
ids = Path(data, "ids.txt").read_text().split()
same = total = 0
for i in ids:
    a = np.asarray(Image.open(f"/tmp/dhr-e2e-device/{i}.png")); b = np.asarray(Image.open(f"/tmp/dhr-e2e-cpu/{i}.png"))
    same += int((a == b).sum()); total += a.size
print(json.dumps({"images": len(ids), "pixel_agreement": same / total}))
PY

# 6. One JSON with everything.
$PY - "$OUT" > "$OUT/gpu_check.json" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        text = (out / name).read_text()
        return json.loads(text.strip().splitlines()[-1]) if name.endswith(".log") else json.loads(text)
    except (OSError, ValueError, IndexError):
        return None
result = {"machine": load("machine.json"), "steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()],
          "agreement": load("agreement.json"), "crf_speed": load("crf_speed.json"), "e2e_agreement": load("e2e_agreement.json")}
for name in ("e2e_device", "e2e_cpu"):
    summary = load(f"{name}.log")
    result[name] = summary and {k: summary.get(k) for k in ("counts", "seconds", "images_per_second", "error")}
for name in ("score_device", "score_cpu"):
    try:
        report = json.loads((out / f"{name}.log").read_text()[(out / f"{name}.log").read_text().index("{"):])
        result[name] = {"miou": report["summary"]["miou"], "vanished": report["summary"]["vanished"]}
    except (OSError, ValueError, KeyError):
        result[name] = None
tests = (out / "tests.log").read_text().strip().splitlines() if (out / "tests.log").exists() else []
result["tests"] = tests[-1] if tests else None
print(json.dumps(result, indent=2))
PY
cat "$OUT/gpu_check.json"
