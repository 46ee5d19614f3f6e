#!/usr/bin/env bash
# Creates the Python virtualenv of the test bed (moto and the cloud SDKs pinned in
# requirements.txt) in a cache outside the repository, and reuses it when it is there.
#
#   e2e/tools/python.sh            create or update the venv if needed, print its directory last
#   e2e/tools/python.sh --print    only print the venv directory
#
# Cache: $CLOUDPASS_PYTHON_DIR, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/python/<first 16 hex of sha256(requirements.txt)>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
requirements="$here/requirements.txt"
# The stamp (and the default directory) follow the exact pins, so changing a pin makes a
# fresh venv instead of upgrading one in place.
stamp_want=$(sha256sum "$requirements" | cut -c1-16)
venv=${CLOUDPASS_PYTHON_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/python/$stamp_want}
if [ "${1:-}" = "--print" ]; then echo "$venv"; exit 0; fi

stamp_file="$venv/.stamp"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp_want" ]; then
  echo "python: reusing the venv in $venv" >&2
  echo "$venv"
  exit 0
fi

command -v python3 >/dev/null || { echo "python: python3 is required; none on PATH" >&2; exit 1; }
start=$(date +%s)
echo "python: creating a venv with moto and the cloud SDKs in $venv (about a minute, once)" >&2
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
log="$venv/pip.log"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >"$log" 2>&1 \
  || { cat "$log" >&2; echo "python: pip install failed (log above)" >&2; exit 1; }
echo "$stamp_want" > "$stamp_file"
echo "python: venv ready in $(( $(date +%s) - start ))s ($("$venv/bin/python" --version))" >&2
echo "$venv"
