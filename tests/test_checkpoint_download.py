"""The speech path reads the checkpoint vLLM serves: `--revision`, `--download-dir`, `HF_HOME`.

No network here, so a local hub cache stands in for the Hub: the tiny checkpoint is laid out in
huggingface_hub's cache layout (blobs, snapshots per commit, refs per branch; checked with
huggingface_hub's own `scan_cache_dir`) under two revisions that differ, once in a download dir
and once under HF_HOME, and the resolver runs with HF_HUB_OFFLINE=1 in a fresh process (the hub
reads these variables at import).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ID = "omni-test/tiny-omni"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}  # branch -> commit


def put_in_hub_cache(
    cache_dir: Path, src: Path, commit: str, ref: str, tag: str
) -> Path:
    """`src`'s files as revision `ref` (commit `commit`) of REPO_ID in a hub cache; returns the
    snapshot folder. config.json is tagged so that each revision is recognisable."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache_dir / repo_folder_name(repo_id=REPO_ID, repo_type="model")
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        if f.name == "config.json":
            config = json.loads(data)
            config["omni_test_revision"] = tag
            data = json.dumps(config).encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hubs(tmp_path_factory, tiny_checkpoint_dir):
    """A download dir and an HF_HOME, each holding REPO_ID at revisions main and v1."""
    from huggingface_hub import scan_cache_dir

    root = tmp_path_factory.mktemp("hubs")
    download_dir, hf_home = root / "download-dir", root / "hf-home"
    snapshots = {}
    for name, cache in (("download_dir", download_dir), ("hf_home", hf_home / "hub")):
        for ref, commit in COMMITS.items():
            snapshots[name, ref] = put_in_hub_cache(
                cache, Path(tiny_checkpoint_dir), commit, ref, f"{name}:{ref}"
            )
        info = scan_cache_dir(
            cache
        )  # huggingface_hub reads the layout as a valid cache
        assert not info.warnings, info.warnings
        (repo,) = info.repos
        assert repo.repo_id == REPO_ID and {
            r.commit_hash for r in repo.revisions
        } == set(COMMITS.values())
    return download_dir, hf_home, snapshots


RESOLVE = textwrap.dedent(
    """
    import json, sys
    from types import SimpleNamespace
    from omni_vllm.checkpoint import engine_checkpoint, local_checkpoint
    from omni_vllm.token2wav import Token2Wav

    download_dir = sys.argv[1]
    def engine(revision, download_dir):
        return SimpleNamespace(model_config=SimpleNamespace(model=%r, revision=revision),
                               load_config=SimpleNamespace(download_dir=download_dir))
    got = {
        "hf_home main": local_checkpoint(%r),
        "hf_home v1": local_checkpoint(%r, revision="v1"),
        "download_dir main": engine_checkpoint(engine(None, download_dir)),
        "download_dir v1": engine_checkpoint(engine("v1", download_dir)),
        "download_dir commit": local_checkpoint(%r, revision=%r, download_dir=download_dir),
    }
    # The speech path loads from the snapshot (symlinks into blobs), voices included.
    assert Token2Wav.from_pretrained(got["download_dir v1"]).voices
    print("RESOLVED " + json.dumps({k: str(v) for k, v in got.items()}))
    """
) % (REPO_ID, REPO_ID, REPO_ID, REPO_ID, COMMITS["v1"])


def test_revision_download_dir_and_hf_home(hubs, tmp_path):
    download_dir, hf_home, snapshots = hubs
    script = tmp_path / "resolve.py"
    script.write_text(RESOLVE)
    repo = Path(__file__).resolve().parents[1]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))
    }
    env.update(
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(download_dir)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESOLVED "))
    got = {k: Path(v) for k, v in json.loads(line[len("RESOLVED ") :]).items()}
    assert got == {
        "hf_home main": snapshots["hf_home", "main"],
        "hf_home v1": snapshots["hf_home", "v1"],
        "download_dir main": snapshots["download_dir", "main"],
        "download_dir v1": snapshots["download_dir", "v1"],
        "download_dir commit": snapshots["download_dir", "v1"],
    }
    for name, path in got.items():  # really the tagged files of that revision and place
        where, ref = name.split()[0], "main" if name.endswith("main") else "v1"
        assert (
            json.loads((path / "config.json").read_text())["omni_test_revision"]
            == f"{where}:{ref}"
        )


def test_local_directory_is_used_as_is(tiny_checkpoint_dir, tmp_path):
    from omni_vllm.checkpoint import local_checkpoint

    assert local_checkpoint(
        tiny_checkpoint_dir, revision="v1", download_dir=str(tmp_path)
    ) == Path(tiny_checkpoint_dir)
    assert not any(tmp_path.iterdir())  # nothing fetched or written
