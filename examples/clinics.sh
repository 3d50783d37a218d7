#!/usr/bin/env bash
# Process the week's photographs of several clinics the way a screening site would: one `fundus run` per
# clinic folder, with the site's configuration, resumable, and one line per clinic in a log.
#
#   examples/clinics.sh /archive/2026-w48 /results/2026-w48 examples/run.toml
#
# IN_ROOT holds one folder per clinic (searched recursively). Each clinic gets OUT_ROOT/<clinic>/ with the
# stage folders, results.csv, manifest.json and report.html. A rerun after a crash or a power cut resumes
# each clinic where it stopped (--resume redoes only what is missing); a clinic already finished is skipped.
# Exit codes of `fundus run`: 0 all ok, 3 some photographs failed (listed in results.csv), 2 bad options or
# folders, 1 fatal (e.g. weights), 130 interrupted.
set -u
IN_ROOT=${1:?usage: clinics.sh IN_ROOT OUT_ROOT [CONFIG.toml]}
OUT_ROOT=${2:?usage: clinics.sh IN_ROOT OUT_ROOT [CONFIG.toml]}
CONFIG=${3:-}
mkdir -p "$OUT_ROOT"
status=0
for clinic in "$IN_ROOT"/*/; do
  name=$(basename "$clinic")
  out="$OUT_ROOT/$name"
  args=("$clinic" "$out" --quiet)
  [ -n "$CONFIG" ] && args+=(--config "$CONFIG")
  if [ -f "$out/manifest.json" ] && grep -q '"status": "finished"' "$out/manifest.json"; then
    echo "$name: already finished, skipped"
    continue
  fi
  [ -e "$out" ] && args+=(--resume)
  fundus run "${args[@]}"
  code=$?
  case $code in
    0) echo "$name: ok -> $out/report.html" ;;
    3) echo "$name: finished, some photographs failed (see $out/results.csv)"; status=3 ;;
    130) echo "$name: interrupted; rerun this script to resume"; exit 130 ;;
    *) echo "$name: fundus run exited $code"; status=1 ;;
  esac
done
exit $status
