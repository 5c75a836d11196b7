#!/bin/sh
# Longer fuzzing campaigns than the test suite's few seconds per target (docs/fuzzing.md):
#   tests/fuzz/campaign.sh [SECONDS PER TARGET] [TARGET...]
# New inputs go to $CASD_FUZZ_OUT/TARGET/new (default fuzz-campaign/), crashes beside them.
set -eu
cd "$(dirname "$0")/../.."
seconds=${1:-600}
[ $# -gt 0 ] && shift
py=.venv/bin/python
targets=${*:-$($py -m tests.fuzz.run --list)}
out=${CASD_FUZZ_OUT:-fuzz-campaign}
status=0
for t in $targets; do
    mkdir -p "$out/$t/new"
    if $py -m tests.fuzz.run "$t" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
            -artifact_prefix="$out/$t/" "$out/$t/new" "tests/fuzz/corpus/$t" >"$out/$t/log" 2>&1; then
        echo "$t: $(grep '^Done ' "$out/$t/log" | tail -n 1)"
    else
        echo "$t: CRASH, see $out/$t/log and $out/$t/crash-*"
        status=1
    fi
done
exit $status
