#!/usr/bin/env bash
# The GPU check: references prepared here, the check run on a bare CUDA machine in parts.
#
#   bash benchmarks/gpu_check.sh prepare DATA   # here, with pydensecrf: fills .gpu/ (git-ignored,
#                                               # ~21 MB, ~2 min for CamVid val: DATA=/path/to/camvid-val)
#   bash benchmarks/gpu_check.sh PART...        # there: tests (~1.5 min), crf (~3), e2e (~2-3), oom (~1), or all
#   bash benchmarks/gpu_check.sh --rehearse     # here: every part on the CPU at tiny sizes (CI runs it)
#
# There: Python 3.12 with torch + CUDA, Triton, typer, h5py, pytest; no pydensecrf and nothing
# to install; .gpu/ is copied there with the tree. Each part runs
# under `timeout 240` and writes $OUT/PART.json (rewritten after every step: a part cut off
# still returns what it did) and $OUT/PART.log: 8 files for the four parts. Details:
# benchmarks/gpu_parts.py; what the figures mean: docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-/tmp/dhr-gpu-check}
PREPARED=${PREPARED:-.gpu}
DEVICE=${DEVICE:-cuda}
PART_LIMIT=${PART_LIMIT:-240}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run_parts() {  # run_parts EXTRA_ARGS -- PART...: each under its time limit; 1 if any failed
    local extra=() status=0
    while [ "$1" != "--" ]; do extra+=("$1"); shift; done
    shift
    mkdir -p "$OUT"
    for part in "$@"; do
        echo "[$(date +%T)] part $part (limit ${PART_LIMIT} s)" >&2
        timeout "$PART_LIMIT" "$PYTHON" benchmarks/gpu_parts.py "$part" --prepared "$PREPARED" --out "$OUT" \
            --device "$DEVICE" "${extra[@]}"
        local rc=$?
        [ $rc -eq 124 ] && echo "part $part: stopped at its ${PART_LIMIT} s limit ($OUT/$part.json says where)" >&2
        [ $rc -ne 0 ] && status=1
    done
    "$PYTHON" - "$OUT" "$@" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for part in sys.argv[2:]:
    path = out / f"{part}.json"
    s = json.loads(path.read_text()) if path.exists() else {"status": "no summary"}
    steps = ", ".join(f"{x['step']} {x['status']}" for x in s.get("steps", []))
    print(f"{part}: {s.get('status')} in {s.get('seconds', '?')} s: {steps}")
PY
    return $status
}

case "${1:-}" in
prepare)
    [ $# -eq 2 ] || { echo "usage: bash benchmarks/gpu_check.sh prepare DATA" >&2; exit 2; }
    exec "$PYTHON" benchmarks/gpu_prepare.py "$2" "$PREPARED"
    ;;
--rehearse)
    # The plumbing of every part on this machine's CPU: tiny generated inputs, Triton under its
    # interpreter, pydensecrf hidden from the parts as on the GPU machine, the parts' file count.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    start=$SECONDS
    "$PYTHON" benchmarks/make_inputs.py "$tmp/data" 3 --scale tiny >/dev/null || exit 1
    "$PYTHON" benchmarks/gpu_prepare.py "$tmp/data" "$tmp/prepared" --images 3 --calls 2 --crf-iters 3 || exit 1
    mkdir -p "$tmp/hidden/pydensecrf"
    echo 'raise ModuleNotFoundError("pydensecrf is hidden as on the GPU machine (gpu_check.sh --rehearse)", name="pydensecrf")' \
        > "$tmp/hidden/pydensecrf/__init__.py"
    OUT="$tmp/out" PREPARED="$tmp/prepared" DEVICE=cpu TRITON_INTERPRET=1 PYTHONPATH="$tmp/hidden:$PYTHONPATH" \
        run_parts --rehearse -- tests crf e2e oom
    status=$?
    files=$(find "$tmp/out" -type f | wc -l)
    skipped=$(grep -l '"status": "skipped"' "$tmp"/out/*.json 2>/dev/null | wc -l)
    echo "rehearsal: $files files in OUT (limit 8), parts with skipped steps: $skipped, $((SECONDS - start)) s" >&2
    [ "$files" -le 8 ] && [ "$skipped" -eq 0 ] && exit $status
    exit 1
    ;;
all)
    run_parts -- tests crf e2e oom
    ;;
tests | crf | e2e | oom)
    run_parts -- "$@"
    ;;
*)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
