"""Refuse truncated image and label files before they are used.

SimpleITK reads a truncated ``.nii.gz`` without complaint and fills the missing voxels with zeros, so a model
would train on a half-empty image or label. :func:`check_file_complete` decompresses a ``.gz`` file to its end
(gzip's end-of-stream marker, CRC and length are checked) and, for NIfTI, compares the voxel bytes present
with what the header announces; PNG files are decoded completely. The error names the file.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from nnunetv2_cimis.errors import CIMISError

_CHUNK = 1 << 20


def _nifti_expected_bytes(header_bytes: bytes):
    """Offset of the voxel data + its size in bytes, from a NIfTI-1/2 header; None if it is not NIfTI."""
    try:
        import nibabel as nib
    except ImportError:  # nibabel comes with nnU-Net; without it only the gzip check runs
        return None
    for header_class in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            header = header_class.from_fileobj(_BytesReader(header_bytes), check=False)
            shape = header.get_data_shape()
            dtype = header.get_data_dtype()
            offset = int(header.get_data_offset())
        except Exception:
            continue
        return offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return None


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        end = len(self.data) if n is None or n < 0 else self.pos + n
        chunk = self.data[self.pos:end]
        self.pos += len(chunk)
        return chunk

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.data) + pos)
        return self.pos

    def tell(self):
        return self.pos


def check_file_complete(path: str, what: str = "file") -> None:
    """Raise :class:`CIMISError` naming ``path`` if it is truncated or its compression is damaged.

    ``.gz``: decompressed to the end (end-of-stream marker, CRC, length). ``.nii`` / ``.nii.gz``: the voxel
    data must be as long as the header says. ``.png``: decoded completely. Other types: only existence.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CIMISError(f"The {what} {path} does not exist.")
    lower = path.lower()
    if lower.endswith(".png"):
        try:
            from PIL import Image
            with Image.open(path) as im:
                im.load()
        except Exception as e:
            raise CIMISError(f"cannot read the {what} {path}: it is damaged or truncated ({e}); replace it with a "
                             f"complete copy.") from None
        return
    is_nifti = lower.endswith(".nii") or lower.endswith(".nii.gz")
    head, total = b"", 0
    try:
        opener = gzip.open if lower.endswith(".gz") else open
        with opener(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                if len(head) < 544:  # enough for a NIfTI-2 header
                    head += chunk[:544 - len(head)]
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        raise CIMISError(f"cannot read the {what} {path}: it is truncated or its compression is damaged ({e}); "
                         f"replace it with a complete copy (re-download or re-export it).") from None
    if is_nifti:
        expected = _nifti_expected_bytes(head)
        if expected is not None and total < expected:
            raise CIMISError(f"cannot read the {what} {path}: it is truncated, its header announces {expected} "
                             f"bytes of header and voxel data, the file holds {total}. Replace it with a complete "
                             f"copy.")
