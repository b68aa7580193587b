import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("RESCASCADE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED_DATA = SHARED / "data"
IMAGENET_WEIGHTS = SHARED_DATA / "mobilenet_v2_imagenet" / "mobilenet_v2_tv_imagenet1k_qnnpack_dequant.pth"
IMAGENETTE = SHARED_DATA / "imagenette_224"
SAMPLE_IMAGES = SHARED_DATA / "imagenet_sample_images"


def need(path: Path):
    """Skip (with the reason) when a piece of ../shared/data is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real data beside the checkout; absent here)")
    return path


@pytest.fixture
def imagenet_weights_path():
    return need(IMAGENET_WEIGHTS)
