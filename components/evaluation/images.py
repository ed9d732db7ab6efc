"""Reading a benchmark's PNG files: RGB uint8, or the benchmark's own input error naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_png(path: Path, error: type[Exception]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise error(f"{path}: not a readable image ({e})") from None
