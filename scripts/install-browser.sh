#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the report's browser test (tests/test_report_browser.py).
# Best effort: where apt-get is missing or not allowed, it says so and the browser test skips with its reason.
set -u
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-browser: no apt-get here; install chromium and chromedriver yourself to run the browser test" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else echo "install-browser: not root and no sudo; the browser test will skip" >&2; exit 0; fi
fi
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
  || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } \
  || echo "install-browser: apt-get could not install chromium; the browser test will skip" >&2
exit 0
