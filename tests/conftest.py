import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARGEN_SHARED_DIR", REPO.parent / "shared"))
LLAMAGEN_FIXTURES = SHARED / "fixtures" / "llamagen"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def llamagen_fixtures() -> Path:
    if not (LLAMAGEN_FIXTURES / "gpt_c2i_tiny.safetensors").is_file():
        pytest.skip(f"LlamaGen fixtures not found at {LLAMAGEN_FIXTURES} (set ARGEN_SHARED_DIR)")
    return LLAMAGEN_FIXTURES


@pytest.fixture(scope="session")
def fmnist_available():
    from argen.data.fashion_mnist import load_fashion_mnist
    from argen.errors import DatasetError

    try:
        load_fashion_mnist("test")
    except DatasetError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
