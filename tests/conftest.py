import os
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "repo-olmo2-tiny"


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory):
    """Run from a scratch folder: ``python -m repo_mlx...`` in a subprocess then
    imports the installed package, not the checkout's repo_mlx/ folder (which
    lacks the subpackages that convert/ and metal/ install as)."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    """The official tiny RePo checkpoint (written by the reference implementation)."""
    return FIXTURE


@pytest.fixture(scope="session")
def reference():
    """The official implementation's outputs for the fixture."""
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the fixture in float32, loaded once."""
    import repo_mlx

    return repo_mlx.load(str(FIXTURE))
