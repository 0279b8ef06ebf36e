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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB. Corrupt or unreadable files raise a UserError."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            array = np.array(im.convert("RGB"))
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
