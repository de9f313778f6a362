"""How omni-vllm installs: a wheel holds our three folders under the `omni_vllm` namespace only
(`api/` and `patches/` stay at the top of the repository, but no top-level `api` or `patches`
package reaches site-packages, where any other project may use those names), with its entry
points and data files. Built from this checkout with pip, as `pip install .` builds it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("omni_vllm-*.whl")
    return zipfile.ZipFile(path)


def test_everything_under_the_namespace(wheel):
    names = wheel.namelist()
    tops = {
        n.split("/")[0]
        for n in names
        if not n.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert tops == {"omni_vllm"}
    for folder in (
        "api",
        "patches",
    ):  # every module of the repository's folder is in the wheel
        for py in (ROOT / folder).rglob("*.py"):
            assert f"omni_vllm/{py.relative_to(ROOT).as_posix()}" in names
    for py in (ROOT / "omni_vllm").rglob("*.py"):
        assert py.relative_to(ROOT).as_posix() in names


def test_every_package_listed():
    """pyproject.toml lists the packages by hand (a find cannot map folders to other names)."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = set()
    for folder in ("omni_vllm", "api", "patches"):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(
                ".".join(parts if folder == "omni_vllm" else ("omni_vllm", *parts))
            )
    assert listed == found


def test_entry_points_and_data(wheel):
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(ep).decode()
    assert "omni_vllm = omni_vllm.api.app:OmniEndpoints" in text
    assert "omni-vllm-serve = omni_vllm.api.serve:main" in text
    assert "omni_vllm = omni_vllm.plugin:register" in text
    static = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "api").rglob("static/*")
        if p.is_file()
    ]
    for rel in static:
        assert f"omni_vllm/{rel}" in wheel.namelist()
