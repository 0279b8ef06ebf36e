"""Reading images and label maps from disk, with errors that name the file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

# What Pillow raises for a truncated, corrupt or unsupported file.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError)


class DataFileError(UserError):
    """A problem with one data file. ``kind`` lets ``emactl data check`` group problems.

    Kinds: ``unreadable``, ``size mismatch``, ``bad value``. ``path`` and ``kind`` are optional
    so that a DataLoader worker can re-raise the error from its message alone (it rebuilds
    exceptions as ``type(message)``); otherwise it would surface as a RuntimeError.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 kind: str = "unreadable") -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.kind = kind


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# Modes whose conversion to 8-bit RGB keeps what the image shows (alpha is dropped).
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# 16-bit grayscale: Pillow's convert("RGB") clips these at 255 (a solid white image).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an open image, scaling 16-bit grayscale to 8 bits.

    Modes that cannot be shown faithfully in 8-bit RGB (32-bit float, integers beyond 16 bits)
    raise a :class:`DataFileError` instead of being clipped.
    """
    mode = im.mode
    if mode in _EIGHT_BIT_MODES:
        return np.array(im.convert("RGB"))
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.array(im).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataFileError(
                f"{path}: image mode {mode} holds values outside 0..65535; save it as 8-bit RGB",
                path, "unreadable",
            )
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # 0..65535 -> 0..255, rounded
        return np.repeat(grey[..., None], 3, axis=2)
    raise DataFileError(
        f"{path}: image mode {mode} cannot be read as 8-bit RGB without loss; save it as 8-bit RGB",
        path, "unreadable",
    )


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB. Corrupt or unreadable files raise a UserError.

    16-bit grayscale images are scaled to 8 bits (65535 -> 255); modes that 8-bit RGB cannot
    hold (e.g. 32-bit float) are refused, so ``emactl data check`` lists them as unreadable.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            array = _to_rgb(im, path)
    except FileNotFoundError:
        raise DataFileError(f"{path}: image file not found", path, "unreadable") from None
    except _DECODE_ERRORS as e:
        message = f"{path}: cannot read image ({_reason(e)})"
        raise DataFileError(message, path, "unreadable") from None
    return array


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map as stored: (H, W) class indices, before any dataset-specific mapping.

    Palette PNGs give their palette indices (not colours), grayscale PNGs their grey values.
    Colour (RGB) label images are refused: their class indices would be ambiguous.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                raise DataFileError(
                    f"{path}: label map is a {mode} colour image; expected a palette or "
                    "grayscale PNG whose pixel values are class indices",
                    path,
                    "unreadable",
                )
            array = np.array(im.convert("L") if mode == "1" else im)
    except FileNotFoundError:
        raise DataFileError(f"{path}: label file not found", path, "unreadable") from None
    except _DECODE_ERRORS as e:
        message = f"{path}: cannot read label map ({_reason(e)})"
        raise DataFileError(message, path, "unreadable") from None
    if array.ndim != 2:
        raise DataFileError(
            f"{path}: label map has shape {array.shape}; expected a single-channel image",
            path,
            "unreadable",
        )
    return array


def require_scipy(path: str | os.PathLike, what: str, fix: str = "") -> None:
    """Raise a UserError naming ``path`` unless scipy (an optional dependency) imports."""
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: reading {what} .mat files needs scipy: pip install scipy "
                        f"(or pip install 'emactl[mat]'){fix}") from None


def load_mat(path: str | os.PathLike, variable: str, what: str, fix: str = "", **kwargs: object) -> dict:
    """``scipy.io.loadmat(path, variable_names=[variable], **kwargs)``, with one-line errors.

    Without scipy: see :func:`require_scipy`. A corrupt file raises a DataFileError.
    """
    require_scipy(path, what, fix)
    from scipy.io import loadmat

    try:
        return loadmat(path, variable_names=[variable], **kwargs)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... for corrupt files
        raise DataFileError(f"{path}: cannot read .mat file ({_reason(e)})", path, "unreadable") from None
