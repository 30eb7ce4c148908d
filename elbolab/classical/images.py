"""Binary test images for the Ising denoiser: a built-in picture, PNG input/output and the two noise models.

Convention everywhere: pixel value +1 is white (bright), -1 is black (dark).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from elbolab.errors import ElbolabError


def builtin_image(size: int = 64) -> np.ndarray:
    """A ``[size, size]`` test picture in ``{-1, +1}``, drawn procedurally (no fonts, no files).

    Black shapes on white: a ring, a filled triangle and a thick letter "T", so the picture has large flat
    regions, straight and curved edges, thin strokes and sharp corners. Coordinates are fractions of the size,
    so every size shows the same picture.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ElbolabError(f"size must be an integer >= 8, got {size!r}.")
    # Pixel centres in [0, 1]^2; row coordinate v grows downwards, column coordinate u to the right.
    v, u = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    radius = np.hypot(u - 0.32, v - 0.32)
    ring = (radius > 0.13) & (radius < 0.24)
    # Triangle with apex (0.75, 0.08) and base from (0.55, 0.45) to (0.95, 0.45): inside all three edges.
    triangle = (v < 0.45) & (np.abs(u - 0.75) < (v - 0.08) * (0.2 / 0.37))
    letter_t = ((v > 0.58) & (v < 0.68) & (u > 0.15) & (u < 0.85)) | ((np.abs(u - 0.5) < 0.06) & (v > 0.58)
                                                                        & (v < 0.92))
    return np.where(ring | triangle | letter_t, -1.0, 1.0)


def image_size(path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header without decoding the pixels (so that a huge image
    can be refused before it fills the memory)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ElbolabError(f"Expected an image file, but {str(path)!r} does not exist or is not a file.")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read here; the size is judged by the caller
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # Pillow raises several types for unreadable files
        raise ElbolabError(f"Could not read {str(path)!r} as an image ({type(error).__name__}: {error}); "
                           "give a PNG file.") from error
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return height, width


def load_png(path, threshold: float = 0.5) -> np.ndarray:
    """Read an image file as a ``{-1, +1}`` array: grey level (RGB mean, in [0, 1]) above ``threshold`` -> +1.

    Transparent pixels are composited onto white first.
    """
    import matplotlib.image as mpimg

    path = Path(path)
    if not path.is_file():
        raise ElbolabError(f"Expected an image file, but {str(path)!r} does not exist or is not a file.")
    try:
        image = np.asarray(mpimg.imread(path))
    except Exception as error:  # Pillow raises several types for unreadable files
        raise ElbolabError(f"Could not read {str(path)!r} as an image ({type(error).__name__}: {error}); "
                           "give a PNG file.") from error
    if image.dtype.kind in "iu":  # 8-bit images from Pillow
        image = image / float(np.iinfo(image.dtype).max)
    image = image.astype(np.float64)
    if image.ndim == 3:
        if image.shape[2] == 4:
            alpha = image[..., 3:4]
            image = image[..., :3] * alpha + (1.0 - alpha)
        image = image[..., :3].mean(axis=2)
    if image.ndim != 2 or image.size == 0:
        raise ElbolabError(f"Expected a 2-D grey or colour image in {str(path)!r}, got array shape {image.shape}.")
    return np.where(image > threshold, 1.0, -1.0)


def save_png(array, path, vmin: float = -1.0, vmax: float = 1.0) -> Path:
    """Write a 2-D array as a grey PNG, ``vmin`` black and ``vmax`` white (values outside are clipped)."""
    import matplotlib.image as mpimg

    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ElbolabError(f"save_png expects a 2-D array, got shape {array.shape}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, np.clip(array, vmin, vmax), cmap="gray", vmin=vmin, vmax=vmax)
    return path


def add_gaussian_noise(clean: np.ndarray, sigma: float, seed: int | None = None) -> np.ndarray:
    """``x = z + sigma * eps`` with ``eps ~ N(0, 1)`` per pixel (the Gaussian observation model)."""
    rng = np.random.default_rng(seed)
    return np.asarray(clean, dtype=np.float64) + sigma * rng.standard_normal(np.shape(clean))


def flip_pixels(clean: np.ndarray, flip_prob: float, seed: int | None = None) -> np.ndarray:
    """Flip the sign of each pixel independently with probability ``flip_prob`` (the flip observation model)."""
    rng = np.random.default_rng(seed)
    clean = np.asarray(clean, dtype=np.float64)
    return np.where(rng.random(clean.shape) < flip_prob, -clean, clean)


def error_rate(estimate, clean) -> float:
    """Fraction of pixels where ``sign(estimate)`` (ties to +1) differs from the clean ``{-1, +1}`` image."""
    estimate, clean = np.asarray(estimate), np.asarray(clean)
    if estimate.shape != clean.shape:
        raise ElbolabError(f"Shapes differ: estimate {estimate.shape} vs clean {clean.shape}.")
    return float(np.mean(np.where(estimate >= 0, 1.0, -1.0) != clean))
