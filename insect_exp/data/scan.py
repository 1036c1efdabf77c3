"""Find the images of a dataset folder: class names, file lists per split, skipped files.

A dataset is ROOT/train/<class>/... and optionally ROOT/test/<class>/...; images may sit at any
depth inside a class folder. Names starting with "." (files and folders, at every depth: hidden
class folders, `.thumbnails/` inside a class, `.DS_Store`) are ignored: neither used nor reported.
Symlinks are followed, to files and to folders. Every other file is either used or reported with a
short, stable reason:

- by `scan`, from names and `stat` alone: `not in a class folder` (a file directly in train/ or
  test/), `not an image file` (an extension other than .jpg .jpeg .png .bmp .gif),
  `unsupported format (webp)` (the extension of another image format: webp, tiff, heic, ...),
  `empty file`, `dangling symlink`, `symlink loop`, `not a file` (a FIFO, socket or device), and
  `permission denied` for a folder that cannot be listed (reported in place of its files);
- by `diagnose`, only for the files that TensorFlow then fails to decode: `truncated`,
  `corrupt JPEG` (or PNG, GIF, BMP, WEBP), `unsupported BMP variant` (Pillow reads it, TensorFlow
  does not), `unsupported format (tiff)` (the content is an image format TensorFlow does not read:
  tiff, heic, heif, avif, jp2, jxl, svg, or any Pillow recognises), `not an image`, `empty file`,
  `permission denied`, `dangling symlink`, `file not found` (gone since the scan), `not a file`,
  `image too large` and `cannot read (<system error>)`;
- by the decoder itself, before it allocates any pixel: `too many pixels (<width>x<height>)`, for
  a file whose header gives more than `dataset.max_image_pixels` (data/decode.py).

TensorFlow decodes by content: a PNG or a WebP image named .jpg is used. Files beyond
`max_per_class` in a class are left out without being reported.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from insect_exp import UserError
from insect_exp.config import MAX_IMAGE_PIXELS

# The extensions scanned as images; anything else is reported, not read.
# TensorFlow's decode_image reads WebP too (checked on TF 2.21).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
# Extensions of image formats that are not scanned: reported as `unsupported format (<name>)`.
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".heic": "heic",
    ".heif": "heif",
    ".avif": "avif",
    ".jxl": "jxl",
    ".jp2": "jp2",
    ".j2k": "jp2",
    ".svg": "svg",
    ".ico": "ico",
    ".psd": "psd",
    ".tga": "tga",
    ".ppm": "ppm",
    ".pgm": "ppm",
    ".pbm": "ppm",
    ".dng": "raw",
    ".cr2": "raw",
    ".cr3": "raw",
    ".nef": "raw",
    ".arw": "raw",
    ".orf": "raw",
    ".rw2": "raw",
    ".raf": "raw",
}
# The formats tf.io.decode_image reads (TensorFlow 2.21), by their content, whatever the extension.
TF_FORMATS = frozenset({"jpeg", "png", "gif", "bmp", "webp"})


class DatasetError(UserError):
    """The dataset folder cannot be trained on as it is."""


@dataclass
class FileList:
    """Image files of one split and their integer labels."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    # A file whose header gives more pixels is refused by this version's decoding, never decoded.
    max_pixels: int = MAX_IMAGE_PIXELS
    # task=multilabel: (files, classes) uint8 label sets, in place of `labels` (data/multilabel.py).
    multi_hot: np.ndarray | None = None
    # Whether decoding takes what the data audit needs of each image (data/audit_inputs.py): off
    # when no audit will run, as hashing every image is a part of decoding's time.
    audit: bool = True

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Manifest:
    """Everything known about a dataset before any image is decoded."""

    root: Path
    class_names: list[str]
    train: FileList
    test: FileList | None
    # (path, reason) for every file (or unlistable folder) that will not be used; hidden names and
    # files beyond max_per_class are not in it.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # What lineage names as the data's source when it is not the root (a CSV file list).
    source: Path | None = None


def _os_reason(err: OSError) -> str:
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, (IsADirectoryError, NotADirectoryError)):
        return "not a file"
    if err.errno == errno.ELOOP:
        return "symlink loop"
    return f"cannot read ({(err.strerror or type(err).__name__).lower()})"


def check_class_names(names: Sequence[str], where: str) -> None:
    """Raise DatasetError for a class name with a control character (newline, tab, NUL, ...).

    Such a name breaks every one-name-a-line file a model is shipped with (labels.txt for TFLite
    maps outputs to names by line), so it is refused, not repaired.
    """
    for name in names:
        bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise DatasetError(
                f"class name {name!r} in {where} has a control character (U+{ord(bad):04X}): "
                "rename it"
            )


def stat_entry(path: str | Path) -> os.stat_result | str:
    """The stat of what PATH points to, or why there is none."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return "dangling symlink" if os.path.islink(path) else "file not found"
    except OSError as err:
        return _os_reason(err)


def list_split(split_dir: Path, skipped: list[tuple[str, str]]) -> list[str]:
    """Sorted class folder names; every other visible entry goes to SKIPPED with its reason."""
    try:
        names = sorted(os.listdir(split_dir))
    except OSError as err:
        raise DatasetError(f"cannot list {str(split_dir)!r}: {_os_reason(err)}") from None
    classes = []
    for name in names:
        if name.startswith("."):
            continue
        st = stat_entry(split_dir / name)
        if isinstance(st, os.stat_result) and stat.S_ISDIR(st.st_mode):
            classes.append(name)
        else:
            reason = st if isinstance(st, str) else "not in a class folder"
            skipped.append((str(split_dir / name), reason))
    return classes


def file_reason(path: str | Path, st: os.stat_result) -> str | None:
    """Why a regular file will not be used, from its name and size; None if it will be tried."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_EXTENSIONS:
        fmt = UNSUPPORTED_IMAGE_EXTENSIONS.get(suffix)
        return f"unsupported format ({fmt})" if fmt else "not an image file"
    if st.st_size == 0:
        return "empty file"
    return None


def class_files(folder: str | Path) -> list[tuple[str, str | None]]:
    """Every visible file under FOLDER, at any depth, with why it cannot be used (None if it may).

    Sorted by path, component by component as pathlib orders paths. Symlinked folders are
    followed, except back into a folder being walked. Paths stay strings: a pathlib.Path per
    file (made, sorted, turned back into text) cost half the scan of 60,000 files.
    """
    found: list[tuple[str, str | None]] = []

    def walk(directory: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            names = os.listdir(directory)
        except OSError as err:
            found.append((directory, _os_reason(err)))
            return
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            st = stat_entry(path)
            if isinstance(st, str):
                found.append((path, st))
            elif stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    found.append((path, "symlink loop"))
                else:
                    walk(path, ancestors | {key})
            elif not stat.S_ISREG(st.st_mode):
                found.append((path, "not a file"))
            else:
                found.append((path, file_reason(path, st)))

    folder = str(folder)
    st = stat_entry(folder)
    if isinstance(st, str):  # gone since it was listed
        return [(folder, st)]
    walk(folder, frozenset({(st.st_dev, st.st_ino)}))
    return sorted(found, key=lambda item: item[0].split(os.sep))


def scan_split(
    split_dir: Path,
    class_names: list[str],
    max_per_class: int | None,
    skipped: list[tuple[str, str]],
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> FileList:
    files = FileList(max_pixels=max_pixels)
    for label, name in enumerate(class_names):
        kept = 0
        for path, reason in class_files(split_dir / name):
            if reason is not None:
                skipped.append((path, reason))
                continue
            if max_per_class is not None and kept >= max_per_class:
                continue
            files.paths.append(path)
            files.labels.append(label)
            kept += 1
    return files


def scan(
    root: str | Path, max_per_class: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Manifest:
    """List ROOT/train/<class>/** and ROOT/test/<class>/**; raise DatasetError if unusable.

    max_pixels: the most pixels a file may have to be decoded (FileList.max_pixels).

    Files are checked here by name, type and size only (see the module docstring for the rules and
    reasons); files that then fail to decode are added to the skipped list by the decoder.
    """
    root = existing_root(root)
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        raise DatasetError(f"{str(root)!r} has no train/ folder (expected ROOT/train/<class>/*)")
    skipped: list[tuple[str, str]] = []
    class_names = list_split(train_dir, skipped)
    check_class_names(class_names, repr(str(train_dir)))
    if len(class_names) < 2:
        raise DatasetError(
            f"{str(train_dir)!r} needs at least 2 class folders, found {len(class_names)}"
        )
    train = scan_split(train_dir, class_names, max_per_class, skipped, max_pixels)
    test = None
    if test_dir.is_dir():
        test_skipped: list[tuple[str, str]] = []
        test_classes = list_split(test_dir, test_skipped)
        if test_classes != class_names:
            raise DatasetError(
                f"test classes {test_classes} differ from train classes {class_names}"
            )
        skipped += test_skipped
        test = scan_split(test_dir, class_names, max_per_class, skipped, max_pixels)
    check_usable(root, class_names, train.labels, None if test is None else test.labels)
    return Manifest(root, class_names, train, test, skipped)


def existing_root(root: str | Path | None) -> Path:
    """ROOT as a folder path (`~` expanded); a DatasetError if it is not a folder."""
    path = Path(root).expanduser() if root is not None else None
    if path is None or not path.is_dir():
        shown = str(path) if path is not None else None
        raise DatasetError(f"dataset root {shown!r} is not a directory (set dataset.root=PATH)")
    return path


def check_usable(
    root: Path,
    class_names: Sequence[str],
    train_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray | None,
) -> None:
    """Raise DatasetError if a split or a train class has no images left."""
    for split, labels in {"train": train_labels, "test": test_labels}.items():
        if labels is not None and len(labels) == 0:
            raise DatasetError(f"the {split} split of {str(root)!r} has no readable images")
    counts = class_counts(train_labels, len(class_names))
    empty = [name for name, n in zip(class_names, counts, strict=True) if n == 0]
    if empty:
        raise DatasetError(f"train classes with no readable images: {', '.join(empty)}")


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class: of integer labels, or of multi-hot rows (task=multilabel)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.sum(axis=0, dtype=np.int64)
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) holding out `fraction` of every class, chosen by `seed`."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"dataset.val_split must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_held = int(round(len(idx) * fraction))
        # Every class must keep at least one training image and give at least one to validation.
        n_held = min(max(n_held, 1), len(idx) - 1)
        if n_held < 1:
            raise DatasetError("dataset.val_split needs at least 2 images in every class")
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


# --- Why a file failed to decode: only for the few that did, so it may read and try harder. ---

_HEAD_BYTES = 512  # enough for every signature below, and for an SVG's "<svg" after its prolog
_TAIL_BYTES = 32
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _le(data: bytes, at: int, size: int, signed: bool = False) -> int:
    """The little-endian integer of SIZE bytes at offset AT."""
    return int.from_bytes(data[at : at + size], "little", signed=signed)


def _sniff(head: bytes) -> str | None:
    """The image format HEAD (a file's first bytes) starts with, by signature; None if none."""
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    # "BM" alone is too common a start for text: also ask for a known DIB header size.
    if head[:2] == b"BM" and _le(head, 14, 4) in _DIB_HEADER_SIZES:
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[4:8] == b"ftyp":  # ISO base media: HEIF/HEIC/AVIF images, or MP4/MOV video
        box_end = min(int.from_bytes(head[:4], "big"), len(head))
        brands = {head[i : i + 4] for i in range(8, box_end - 3, 4) if i != 12}  # 12: version
        if brands & {b"avif", b"avis"}:
            return "avif"
        if brands & _HEIC_BRANDS:
            return "heic"
        if brands & {b"mif1", b"msf1"}:
            return "heif"
        return None
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jp2"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "jxl"
    if b"<svg" in head.lower():
        return "svg"
    return None


def _pil_format(path: Path) -> str | None:
    """The format Pillow recognises PATH as (reading its header only), lower case; None if none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return (image.format or "").lower() or None
    except Exception:  # noqa: BLE001  (anything Pillow cannot open is simply not recognised)
        return None


def _cut_short(fmt: str, head: bytes, tail: bytes, size: int) -> bool:
    """Whether a file of format FMT ends before its format says it does."""
    if fmt == "jpeg":  # ends with the EOI marker (a few padding bytes after it are tolerated)
        return b"\xff\xd9" not in tail
    if fmt == "png":  # ends with the IEND chunk: its type, then its 4-byte CRC
        at = tail.rfind(b"IEND")
        return at < 0 or len(tail) - at < 8
    if fmt == "gif":  # ends with the trailer byte
        return not tail.rstrip(b"\x00").endswith(b";")
    if fmt == "webp":  # the RIFF header gives the file size
        return _le(head, 4, 4) + 8 > size
    if fmt == "bmp":  # the headers give the file size, the pixel data offset and, uncompressed,
        needed = max(_le(head, 2, 4), _le(head, 10, 4))  # the size of the pixel rows
        if _le(head, 14, 4) >= 40 and _le(head, 30, 4) in (0, 3):  # BI_RGB, BI_BITFIELDS
            width, height = abs(_le(head, 18, 4, True)), abs(_le(head, 22, 4, True))
            needed = max(
                needed, _le(head, 10, 4) + (width * _le(head, 28, 2) + 31) // 32 * 4 * height
            )
        return needed > size
    return False


def _pil_verdict(path: Path, fmt: str) -> str:
    """Decode with Pillow: a truncated or corrupt file, or one only TensorFlow fails on."""
    name = fmt.upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.load()
    except Image.DecompressionBombError:
        return "image too large"
    except Exception as err:  # noqa: BLE001  (Pillow raises many types for broken files)
        return "truncated" if "truncated" in str(err).lower() else f"corrupt {name}"
    return f"unsupported {name} variant"  # e.g. a 1-bit BMP: Pillow reads it, TensorFlow does not


def diagnose(path: str | Path) -> str:
    """Why a file TensorFlow failed to decode cannot be used, in a few stable words.

    Meant only for files that already failed (it reads the file's first and last bytes, and may
    decode it with Pillow); the reasons are listed in the module docstring.
    """
    path = Path(path)
    st = stat_entry(path)
    if isinstance(st, str):
        return st
    if not stat.S_ISREG(st.st_mode):
        return "not a file"
    if st.st_size == 0:
        return "empty file"
    try:
        with path.open("rb") as f:
            head = f.read(_HEAD_BYTES)
            f.seek(max(0, st.st_size - _TAIL_BYTES))
            tail = f.read(_TAIL_BYTES)
    except OSError as err:
        return _os_reason(err)
    fmt = _sniff(head) or _pil_format(path)
    if fmt is None:
        return "not an image"
    if fmt not in TF_FORMATS:
        return f"unsupported format ({fmt})"
    if _cut_short(fmt, head, tail, st.st_size):
        return "truncated"
    return _pil_verdict(path, fmt)
