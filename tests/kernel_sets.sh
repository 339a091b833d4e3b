#!/usr/bin/env bash
# The suite under each of ATen's CPU kernel sets, and the numerics-heavy files with one and two torch
# threads: what a machine with other kernels would run. Each numeric comparison logs its error in units of
# eps (tests/tolerance.py); the summary prints every call site's worst case against its budget.
#
#   bash tests/kernel_sets.sh                # default, avx2 and this CPU's own kernels (~35 min on 2 cores)
#   KERNEL_SETS="default" bash tests/kernel_sets.sh
#
# Each kernel set gets its own inductor cache: inductor's caches do not key on ATEN_CPU_CAPABILITY, and
# code compiled for one kernel set fails to build under another (at::vec undeclared).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${KERNEL_SETS_OUT:-$(mktemp -d)}
mkdir -p "$out"
log="$out/tolerance.jsonl"
: >"$log"
numerics="tests/test_golden.py tests/test_skip.py tests/test_calibrate_steps.py tests/test_families.py tests/test_dtypes.py tests/test_guidance_reuse.py"
status=0
for capability in ${KERNEL_SETS:-default avx2 native}; do
  env=(TCPASS_TOLERANCE_LOG="$log" TORCHINDUCTOR_CACHE_DIR="$out/inductor-$capability")
  [ "$capability" = native ] || env+=(ATEN_CPU_CAPABILITY="$capability")
  echo "== kernel set $capability: whole suite, 2 workers x 1 thread"
  env "${env[@]}" python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider >"$out/$capability-suite.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$out/$capability-suite.log"
  echo "== kernel set $capability: numerics-heavy files, 1 process x 2 threads"
  env "${env[@]}" TCPASS_TEST_THREADS=2 python -m pytest -q -p no:cacheprovider $numerics >"$out/$capability-2t.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$out/$capability-2t.log"
done
python - "$log" <<'PY'
import json
import sys
from collections import defaultdict

worst = defaultdict(lambda: {"measured": 0.0, "n": 0, "where": {}})
for line in open(sys.argv[1]):
    r = json.loads(line)
    w = worst[r["site"]]
    w["units"], w["n"] = r["units"], w["n"] + 1
    key = f'{r["capability"]}/{r["threads"]}t'
    w["where"][key] = max(w["where"].get(key, 0.0), r["measured"])
    w["measured"] = max(w["measured"], r["measured"])
print(f"\n{'call site':36} {'budget':>7} {'worst':>9} {'margin':>8}  worst per kernel set/threads")
for site, w in sorted(worst.items(), key=lambda kv: -(kv[1]["measured"] / (kv[1]["units"] or 1))):
    margin = "exact" if w["units"] == 0 else f'{w["units"] / w["measured"]:.0f}x' if w["measured"] else "inf"
    per = " ".join(f"{k}:{v:.3g}" for k, v in sorted(w["where"].items()))
    print(f'{site:36} {w["units"]:>7} {w["measured"]:>9.3g} {margin:>8}  {per}')
print(f"\n{len(worst)} call sites, {sum(w['n'] for w in worst.values())} comparisons; log: {sys.argv[1]}")
PY
exit $status
