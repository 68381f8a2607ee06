#!/usr/bin/env bash
# mypy over bench/, then spherefmt/, backends/ and runtime/ as they install (backends/ and runtime/ become
# spherefmt.backends and spherefmt.runtime, a mapping mypy cannot follow in the source tree):
# a tree of links in build/typecheck gives it the installed layout.
set -euo pipefail
py=${PYTHON:-python}
[[ $py == */* ]] && py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"  # absolute, links kept (a venv)
cd "$(dirname "$0")/.."
# bench/: scripts run from their own folder (they import bench/common.py as `common`)
(cd bench && "$py" -m mypy --config-file ../pyproject.toml --cache-dir ../build/mypy-bench --explicit-package-bases ./*.py)
root=build/typecheck
rm -rf "$root"
mkdir -p "$root/spherefmt"
for f in spherefmt/*; do ln -s "$PWD/$f" "$root/spherefmt/"; done
ln -s "$PWD/backends" "$root/spherefmt/backends"
ln -s "$PWD/runtime" "$root/spherefmt/runtime"
cd "$root"
exec "$py" -m mypy --config-file "$OLDPWD/pyproject.toml" -p spherefmt
