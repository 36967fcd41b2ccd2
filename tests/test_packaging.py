"""The package works from a wheel, from any directory: its gin files ship inside it.

setup.py installs the repository's top-level gin/ and configs/ as gqa_t5x/gin
and gqa_t5x/configs; `gin_config.resource_root()` finds them (in the package,
or in the source checkout of an editable install), so `gin/runs/uptrain.gin`
and `include 'gin/...'` resolve from any working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gqa_t5x import gin_config
from paths import REPO


def _gin_files(root: Path) -> list[str]:
    """The gin files under root's gin/ and configs/, relative to root."""
    return sorted(path.relative_to(root).as_posix()
                  for folder in gin_config.GIN_FOLDERS for path in (root / folder).rglob("*.gin"))


def _package_files(root: Path) -> list[str]:
    """Every file of an installed package but Python's bytecode caches."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts)


def _checkout_gin_files() -> list[str]:
    if not (REPO / "gin").is_dir():
        pytest.skip(f"no gin/ folder in {REPO} (not a source checkout)")
    return _gin_files(REPO)


def test_gin_names_resolve_in_the_package_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = gin_config.resource_root()
    for name in ("gin/runs/uptrain.gin", "configs/sweeps/tiny_shared_data.gin"):
        assert gin_config.resolve_gin_file(name) == str(root / name)
    # Includes (`include 'gin/models/t5_1_1/common.gin'`) resolve too.
    config = gin_config.parse_gin(["gin/models/t5_1_1/tiny.gin", "gin/runs/uptrain.gin"], check_required=False)
    assert "CHECKPOINT_PERIOD" in config
    # A path as given (relative to the cwd, or absolute) wins over the package (T5X's order).
    local = tmp_path / "gin" / "runs" / "uptrain.gin"
    local.parent.mkdir(parents=True)
    local.write_text("X = 1\n")
    assert gin_config.resolve_gin_file("gin/runs/uptrain.gin") == str(local.resolve())
    assert gin_config.resolve_gin_file(str(local)) == str(local.resolve())


def test_every_gin_file_of_the_checkout_is_a_package_resource():
    expected = _checkout_gin_files()
    assert "gin/runs/uptrain.gin" in expected and "configs/sweeps/tiny_shared_data.gin" in expected
    assert _gin_files(gin_config.resource_root()) == expected


def test_default_shared_dir_is_the_variable_else_beside_the_checkout(monkeypatch, tmp_path):
    from gqa_t5x.experiments.study import reproduction

    monkeypatch.setenv("GQA_T5X_SHARED", str(tmp_path))
    assert reproduction.default_shared_dir() == tmp_path
    monkeypatch.delenv("GQA_T5X_SHARED")
    monkeypatch.chdir(tmp_path)
    checkout = gin_config.source_checkout()
    assert reproduction.default_shared_dir() == (checkout or tmp_path).parent / "shared"


def _run(argv: list, cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.study
def test_wheel_in_a_fresh_venv_runs_bench_and_quickstart_outside_the_checkout(tmp_path):
    expected = _checkout_gin_files()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GQA_T5X_SHARED", "PIP_REQUIRE_VIRTUALENV")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PIP_DISABLE_PIP_VERSION_CHECK="1")

    # Build from a copy: an in-tree build leaves build/ (stale files for later wheels) in the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("gqa_t5x", *gin_config.GIN_FOLDERS):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp_path / "wheels", src], tmp_path, env)
    (wheel,) = (tmp_path / "wheels").glob("gqa_t5x-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(n.removeprefix("gqa_t5x/") for n in archive.namelist() if n.endswith(".gin"))
    assert shipped == expected

    # A fresh venv reusing the installed dependencies; the wheel goes into its
    # own site-packages, which precedes the system's (and the editable
    # install's finder, appended to sys.meta_path).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path, env)
    python, tool = venv / "bin" / "python", venv / "bin" / "gqa-t5x"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", wheel], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"  # outside the checkout, no gin/ here
    elsewhere.mkdir()
    assert REPO not in elsewhere.resolve().parents
    probe = _run([python, "-c", "import json, gqa_t5x; from gqa_t5x import gin_config as g; print(json.dumps("
                  "[gqa_t5x.__file__, str(g.resource_root()), g.resolve_gin_file('gin/runs/uptrain.gin')]))"],
                 elsewhere, env)
    package_file, root, uptrain = json.loads(probe.stdout.strip().splitlines()[-1])
    site = venv.resolve() / "lib"
    assert Path(package_file).resolve().is_relative_to(site), package_file  # not the editable checkout
    assert Path(root) == Path(package_file).resolve().parent and Path(uptrain) == Path(root) / "gin/runs/uptrain.gin"
    installed = _package_files(Path(root))

    _run([tool, "bench", "--gin_file", "gin/models/t5_1_1/tiny.gin", "--num_kv_heads", "1,4",
          "--input_length", "8", "--output_length", "3", "--batch_size", "2", "--repeats", "1",
          "--bandwidth_mb", "8", "--no_huggingface", "--output", elsewhere / "bench" / "tiny"], elsewhere, env)
    for suffix in (".json", ".md", ".png"):
        assert (elsewhere / "bench" / f"tiny{suffix}").stat().st_size > 0
    bench = json.loads((elsewhere / "bench" / "tiny.json").read_text())
    assert sorted(row["num_kv_heads"] for row in bench["rows"]) == [1, 4]

    _run([tool, "quickstart", "--reduced", "--output", elsewhere / "qs"], elsewhere, env)
    report = elsewhere / "qs" / "report"
    assert (report / "reproduction.md").stat().st_size > 0
    claims = json.loads((report / "reproduction.json").read_text())["claims"]
    assert claims and all("verdict" in claim for claim in claims)
    # Outputs went where they were asked to, nothing into the installed package.
    assert sorted(p.name for p in elsewhere.iterdir()) == ["bench", "qs"]
    assert _package_files(Path(root)) == installed
