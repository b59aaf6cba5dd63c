#!/usr/bin/env bash
# The test suite against the declared minimum versions: every `name>=X` of pyproject's
# [project] dependencies installed as `name==X` (read from pyproject, so the pins cannot drift
# from the floors), the package itself with --no-deps, the `test` extras at whatever versions
# pip finds compatible with those pins. Notebooks are not run here (`make test` runs them).
#
#   bash .ci/min_versions.sh            # venv in .venv-min, reused while the pins are unchanged
#   MIN_VENV=/tmp/v bash .ci/min_versions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${MIN_VENV:-.venv-min}
start=$(date +%s)

pins=$("$PYTHON" - <<'EOF'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
out = []
for req in project["dependencies"]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)\s*(,[^;]*)?(;.*)?", req)
    if not m:
        sys.exit(f"min_versions: dependency {req!r} has no '>=' floor")
    name, extras, floor, _, marker = m.groups()
    out.append(f"{name}{extras or ''}=={floor}{marker or ''}")
print("\n".join(out))
EOF
)
tests=$("$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]))')

stamp="$VENV/.pins"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$pins"$'\n'"$tests" ]]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo '*' >"$VENV/.gitignore"  # keep the venv out of git without touching the repo's .gitignore
    "$VENV/bin/python" -m pip install -q --upgrade pip
    printf '%s\n' "$pins" >"$VENV/constraints.txt"
    printf '%s\n' "$tests" >"$VENV/test-extras.txt"
    # the pins as constraints too: no test extra may pull a newer numpy, pandas, ... than the floor
    "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -r "$VENV/constraints.txt" -r "$VENV/test-extras.txt"
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    printf '%s\n%s\n' "$pins" "$tests" >"$stamp"
fi
echo "min_versions: installed $(date +%s | awk -v s="$start" '{print $1 - s}') s after start:"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(anndata|h5py|matplotlib|mudata|numba|numpy|pandas|scanpy|scipy|session.info|torch|tqdm) ' | tr -s ' ' | paste -sd ' '

OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" "$VENV/bin/python" -m pytest -n 2 -p no:cacheprovider tests
echo "min_versions: done in $(date +%s | awk -v s="$start" '{print $1 - s}') s"
