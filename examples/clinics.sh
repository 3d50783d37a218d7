#!/usr/bin/env bash
# Process the week's photographs of several clinics the way a screening site would: one `fundus run` per
# clinic folder, with the site's configuration, resumable, and one line per clinic on stdout (what
# `fundus run` itself prints goes to OUT_ROOT/<clinic>.fundus.log).
#
#   examples/clinics.sh /archive/2026-w48 /results/2026-w48 examples/run.toml
#
# IN_ROOT holds one folder per clinic (searched recursively). Each clinic gets OUT_ROOT/<clinic>/ with the
# stage folders, results.csv, manifest.json and report.html. Every run of the script resumes each clinic
# that has an output folder (--resume redoes only what is missing), so it can be run again after a crash
# or a power cut, and again when photographs arrive later in the week or a failed one is replaced: those
# are processed, the rest is kept byte for byte. A clinic folder without photographs (files or links to
# files of the kinds fundus reads) is reported and skipped. A clinic already run with another configuration
# or other weights is refused on a rerun (exit 2: resume never mixes two): move its folder away to redo it.
# Photographs lying directly in IN_ROOT belong to no clinic and are not processed (said once).
# Exit codes of `fundus run`: 0 all ok, 3 some photographs failed (listed in results.csv), 2 bad options or
# folders, 1 fatal (e.g. weights), 130 interrupted. The script exits with the most serious of its clinics':
# 130 (it stops there), then 1 for any clinic that ended on an error (1 or 2), then 3, then 0.
set -u
shopt -s nullglob
IN_ROOT=${1:?usage: clinics.sh IN_ROOT OUT_ROOT [CONFIG.toml]}
OUT_ROOT=${2:?usage: clinics.sh IN_ROOT OUT_ROOT [CONFIG.toml]}
CONFIG=${3:-}
if [ ! -d "$IN_ROOT" ]; then
  echo "clinics.sh: IN_ROOT $IN_ROOT is not a folder" >&2
  exit 2
fi
clinics=("$IN_ROOT"/*/)
if [ ${#clinics[@]} -eq 0 ]; then
  echo "clinics.sh: IN_ROOT $IN_ROOT holds no clinic folder" >&2
  exit 2
fi
if [ -n "$(find "$IN_ROOT" -maxdepth 1 -type f -print -quit)" ]; then
  echo "note: files directly in $IN_ROOT belong to no clinic and are not processed" >&2
fi
mkdir -p "$OUT_ROOT"
status=0
for clinic in "${clinics[@]}"; do
  name=$(basename "$clinic")
  out="$OUT_ROOT/$name"
  # a photograph: a file (or a link to one) of the kinds fundus reads; Thumbs.db, .DS_Store or notes are not
  if [ -z "$(find -L "$clinic" -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.tif' \
        -o -iname '*.tiff' -o -iname '*.bmp' -o -iname '*.gif' -o -iname '*.ppm' \) -print -quit 2>/dev/null)" ]; then
    echo "$name: no photographs, nothing to do"
    continue
  fi
  args=("$clinic" "$out" --quiet)
  [ -n "$CONFIG" ] && args+=(--config "$CONFIG")
  [ -e "$out" ] && args+=(--resume)
  fundus run "${args[@]}" >>"$OUT_ROOT/$name.fundus.log" 2>&1
  code=$?
  case $code in
    0) echo "$name: ok -> $out" ;;
    3) echo "$name: finished, some photographs failed (see $out/results.csv)"; [ $status -eq 0 ] && status=3 ;;
    130) echo "$name: interrupted; rerun this script to resume"; exit 130 ;;
    *) echo "$name: fundus run exited $code (see $OUT_ROOT/$name.fundus.log)"; status=1 ;;
  esac
done
exit $status
