#!/usr/bin/env bash
# The test command (README quickstart command 2, and .ci/run): install the package with the dev extra into
# the active Python environment, make sure headless Chromium is there, run every test.
# The gallery test renders the HTML gallery in headless Chromium; when Chromium is missing this installs
# Debian's `chromium` package. If that cannot be done, the tests still run and the gallery test fails saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

have_chromium() {  # the names tests/test_gallery.py looks for
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1
}

if ! have_chromium; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found and apt-get is not available: install Chromium with this system's package manager;" \
         "until then the gallery test fails" >&2
  else
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "installing Debian's chromium (the gallery test renders HTML in it headless)" >&2
    if ! ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null); then
      echo "could not install chromium (apt-get install chromium failed); the gallery test will fail and say so" >&2
    fi
  fi
fi

pip install -q -c constraints.txt -e ".[dev]"
python -m pytest -q --durations=15 "$@"
