#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml (`make lock`): run it after adding, removing
# or changing a dependency, and commit the result with the change.
#
#   requirements.lock          everything `make install` and CI install: the base
#                              (serving) dependencies + the pipeline and dev extras
#   requirements-runtime.lock  base + pipeline without dev, for the dagster and collector images
#   requirements-serving.lock  the base dependencies alone (`recsys[serving]`), for the
#                              serving image: no Dagster
#
# Both are resolved for CPython 3.11 on x86-64 Linux (what CI and the images run) with
# every artifact's sha256, so `pip install -r` refuses anything else. Pins already in
# the lock are kept while they still satisfy pyproject.toml: a refresh changes only what
# it must. `make lock UPGRADE=1` (or `scripts/lock.sh --upgrade`) moves everything to the
# newest allowed versions instead; `--upgrade-package NAME` moves one.
set -euo pipefail
cd "$(dirname "$0")/.."

UV="${UV:-.venv/bin/uv}"
if [[ ! -x "$UV" ]]; then
    echo "lock.sh: $UV not found: run \`make install\` first (uv comes with the dev extra)" >&2
    exit 2
fi
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
common=("${target[@]}" --generate-hashes --quiet --custom-compile-command "make lock" "$@")

"$UV" pip compile pyproject.toml --extra pipeline --extra dev "${common[@]}" -o requirements.lock

# The images' sets are resolved alone but held to the versions just locked for the whole
# project, so the images run exactly the libraries CI tested.
"$UV" pip compile pyproject.toml --extra pipeline -c requirements.lock "${common[@]}" \
    -o requirements-runtime.lock
"$UV" pip compile pyproject.toml -c requirements.lock "${common[@]}" -o requirements-serving.lock
for lock in requirements.lock requirements-runtime.lock requirements-serving.lock; do
    echo "lock.sh: wrote $lock ($(grep -c '==' "$lock") pins)"
done
