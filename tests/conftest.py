import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
REAL_NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def real_npz() -> Path:
    """The real PneumoniaMNIST file (../shared/data beside the repository)."""
    path = Path(os.environ.get("KD_KERAS_TEST_NPZ", REAL_NPZ))
    if not path.is_file():
        pytest.fail(f"real PneumoniaMNIST file not found at {path}; set KD_KERAS_TEST_NPZ")
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A MedMNIST-layout npz with 28x28 grey images, 2 classes, no val split."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    labels = {"train": [0] * 12 + [1] * 28, "test": [0] * 5 + [1] * 5}
    arrays = {}
    for split, y in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 255, (len(y), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.asarray(y, np.uint8).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def write_images(folder: Path, n: int, size=(40, 30), mode="L", ext=".jpeg") -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    names = []
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
            folder / f"img{i}{ext}"
        )
        names.append(f"img{i}{ext}")
    return names
