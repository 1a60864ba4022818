from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "repo-olmo2-tiny"


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
