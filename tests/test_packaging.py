"""sd as pip installs it from a wheel (`pip install .`): every module of sd/, and the data it reads (the tokenizer's
files, the demo model) carried as sd/data, since a wheel has no data/ beside the package."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ("vocab.json", "merges.txt", "sd-demo.safetensors")


def test_the_wheel_carries_every_module_and_the_data(tmp_path):
    # the build the user's pip runs, on a copy of the checkout's sources (pip builds in the tree it is given), without
    # fetching a build backend (setuptools, a test tool: pyproject.toml)
    source = tmp_path / "source"
    shutil.copytree(ROOT / "sd", source / "sd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "cli.py", *(f"data/{name}" for name in DATA_FILES)):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel, = tmp_path.glob("sd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "sd").rglob("*.py")}
    assert modules - names == set()  # a package missing from pyproject.toml's list is missing here
    assert "cli.py" in names
    assert {f"sd/data/{name}" for name in DATA_FILES} <= names


def test_the_data_folder_is_data_in_a_checkout_and_sd_data_where_installed(tmp_path):
    from sd.files import DATA_DIR

    assert DATA_DIR == ROOT / "data"
    # site-packages after `pip install`: sd/files beside sd/data, no data/ above them
    (tmp_path / "sd" / "files").mkdir(parents=True)
    (tmp_path / "sd" / "__init__.py").write_text("")
    (tmp_path / "sd" / "files" / "__init__.py").write_text((ROOT / "sd" / "files" / "__init__.py").read_text())
    (tmp_path / "sd" / "data").mkdir()
    (tmp_path / "sd" / "data" / "vocab.json").write_text("{}")
    # -S: no site-packages, so that this `sd` is the one imported, not the checkout's
    found = subprocess.run([sys.executable, "-S", "-c", "import sd.files; print(sd.files.DATA_DIR)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == str((tmp_path / "sd" / "data").resolve())
