#!/usr/bin/env bash
# Installs Debian's chromium, which tests/integration/test_report.py uses to render a report headless.
# Idempotent: an installed chromium is left alone. Needs root (CI and dev machines).
set -euo pipefail
if command -v chromium >/dev/null; then
  echo "chromium: already installed"; exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
chromium --version
