"""``import tokensieve`` and ``tokensieve.load`` work from a clone's root, from its parent folder (where Python
finds the clone before the installed package) and from anywhere else."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import tokensieve, tokensieve.engine, tokensieve.testing, tokensieve.eval; "
         "assert callable(tokensieve.load) and tokensieve.Engine is tokensieve.engine.Engine; "
         "print(tokensieve.__version__, os.path.realpath(tokensieve.engine.__file__))")


def probe(cwd) -> str:
    proc = subprocess.run([sys.executable, "-c", "import os; " + PROBE], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@pytest.fixture()
def parent_of_a_clone(tmp_path):
    """A folder holding the repository under the name a clone gets: ``tokensieve``."""
    os.symlink(ROOT, tmp_path / "tokensieve")
    return tmp_path


def test_import_from_the_parent_folder_of_a_clone(parent_of_a_clone):
    version, engine_file = probe(parent_of_a_clone)
    assert engine_file == os.path.realpath(os.path.join(ROOT, "engine", "__init__.py"))


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_import_from_the_root_and_from_elsewhere(where, tmp_path):
    version, engine_file = probe(ROOT if where == "root" else tmp_path)
    assert engine_file == os.path.realpath(os.path.join(ROOT, "engine", "__init__.py"))


def test_load_and_the_command_from_the_parent_folder_of_a_clone(parent_of_a_clone):
    scene = os.path.join(ROOT, "examples", "scene.png")
    code = (f"import tokensieve; r = tokensieve.load().generate('What color is the circle?', images=[{scene!r}]); "
            "print(r.text)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=parent_of_a_clone, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "red", proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "tokensieve", "pruners"], cwd=parent_of_a_clone, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "fastv:" in proc.stdout, proc.stderr[-2000:]
