#!/usr/bin/env bash
# The Debian packages the test suite needs, installed when missing. Shared by `make test`
# and .ci/run, so a newcomer's `make test` needs no other step and CI never skips a test
# for a missing binary:
#   postgresql               real server for the production Dagster instance (tests/pg_support.py)
#   prometheus               promtool: check config/rules, rule unit tests; the server the
#                            Grafana dashboard queries are run against
#   prometheus-alertmanager  amtool and the Alertmanager the routing test starts
#   docker-registry          the OCI registry the promoted model image is pushed to
#   chromium, chromium-driver, fonts-liberation   headless browser tests (text needs a font)
#   make                     what runs `make test` (for .ci/run on a bare machine)
#
# All present: does nothing (no apt-get update, no network). Some missing:
#   - as root: apt-get update, then installs only those (no recommends);
#   - with passwordless sudo: the same through `sudo -n`;
#   - otherwise: names the missing packages and the command to run, and exits 1, so
#     `make test` stops before running tests that would fail for a missing binary.
# `--check` only reports (exit 1 when something is missing) and never installs.
# Not Debian (no dpkg-query): names the packages to install by other means, exits 1.
set -euo pipefail

APT_PACKAGES=(
  make postgresql prometheus prometheus-alertmanager docker-registry
  chromium chromium-driver fonts-liberation
)

check_only=false
case "${1:-}" in
  --check) check_only=true ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "system-deps: cannot check system packages here (no dpkg-query: not Debian/Ubuntu)." >&2
  echo "system-deps: the tests need the equivalents of: ${APT_PACKAGES[*]}" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  # db:Status-Status is "installed" only for a configured package, not a removed one.
  [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" == installed ]] \
    || missing+=("$pkg")
done
((${#missing[@]})) || exit 0

command_line="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if $check_only; then
  echo "system-deps: missing Debian packages: ${missing[*]}" >&2
  exit 1
fi

as=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    as=(sudo -n)
  else
    {
      echo "system-deps: the tests need Debian packages that are not installed: ${missing[*]}"
      echo "system-deps: install them as root, then run make test again:"
      echo "    sudo sh -c '$command_line'"
    } >&2
    exit 1
  fi
fi

echo "system-deps: installing ${missing[*]}${as:+ (with sudo)}"
"${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
