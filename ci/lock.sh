#!/usr/bin/env bash
# Refresh constraints.txt: the exact versions of every package the tests passed with.
#   bash ci/lock.sh          # a fresh venv with the newest releases pyproject.toml allows
# Then run the tests (`pytest`) with the new pins before committing constraints.txt. The
# README's set-up, .ci/run and envs/dalipipe.yaml install with `-c constraints.txt`, so a
# cluster that installs dalipipe a year from now gets the versions CI tested, not the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e '.[test]'
{
  echo "# Exact versions the tests passed with; refreshed by bash ci/lock.sh (see there)."
  # torch's local label (+cpu, +cu128) names the build, not the release: the pin takes either
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
