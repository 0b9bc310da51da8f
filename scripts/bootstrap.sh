# Sourced by scripts/test and scripts/demo: make .venv with the project installed.
# Re-running is cheap: pip skips what is already satisfied.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "chatgate needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "==> creating $ROOT/.venv"
  "$PYTHON" -m venv "$ROOT/.venv"
fi
VENV="$ROOT/.venv"
STAMP="$VENV/.chatgate-installed"
# Reinstall only when the dependency lists changed since the last install.
DEPS_HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$DEPS_HASH" ]; then
  echo "==> installing chatgate and its dependencies into .venv"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e "$ROOT/clients/python" -e "$ROOT[dev]"
  echo "$DEPS_HASH" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
