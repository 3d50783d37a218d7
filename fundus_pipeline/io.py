"""Image IO that keeps what users have: bit depth, alpha, orientation; atomic writes.

Reading (``read_image``) returns the pixels in their native dtype (uint8 or uint16) with a small
``ImageMeta`` record, and raises ``InputError`` with a one-line message for anything it cannot read.
The decoder is chosen from the file's *content* (magic bytes), not its extension:

* PNG: OpenCV ``IMREAD_UNCHANGED`` (keeps 16-bit and alpha; imageio's Pillow path would silently
  read 16-bit RGB as 8-bit), after a Pillow ``verify()`` that detects truncated/corrupt files. Palette
  PNGs go through Pillow (converted to RGB/RGBA, or raw indices with ``raw_palette=True``).
* JPEG, BMP, GIF: Pillow with ``LOAD_TRUNCATED_IMAGES`` off, so a truncated JPEG raises instead of
  coming back half grey.
* TIFF: tifffile (first page; 8/16-bit; float and 32-bit integer TIFFs are refused). tifffile's log
  messages and Pillow's warnings are silenced during the read (the ``InputError`` is the one message),
  and pixel data that extends past the end of the file is refused before any decoder runs.
* PPM/PGM: OpenCV (keeps 16-bit), after a Pillow load that detects truncation.

EXIF orientation (JPEG, PNG ``eXIf``, TIFF tag 274) is applied, so arrays are upright. Multi-frame
GIF/TIFF: the first frame is read.

Size limit: an image with more than ``MAX_PIXELS`` pixels (width x height) is refused with
``InputError("... image is too large to decode safely ...")`` before decoding. ``MAX_PIXELS`` is
``2 * PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 with Pillow's default), the count at which Pillow raises
``DecompressionBombError`` for PNG/JPEG/BMP/GIF/PPM; TIFF headers are checked against the same constant
(tifffile has no limit of its own: a 1.4 MB tiled TIFF can declare 20000x20000x3 pixels).

Writing (``write_image_atomic``) is PNG only (lossless, 8/16-bit, 1-4 channels). Every write goes to a
hidden temp file ``.<name>.<12 hex>.tmp`` in the destination folder (``<name>`` shortened when needed so
the temp name fits ``NAME_MAX`` = 255 bytes) and is moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import threading
import unicodedata
import uuid
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from fundus_pipeline.errors import DiskFullError, FundusError, InputError, UsageError, no_space

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm", ".gif")
MIN_SIDE = 16
#: Largest accepted width x height: the count at which Pillow raises DecompressionBombError (see module doc).
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89478485)
NAME_MAX = 255  # bytes of one file name in the filesystem encoding (ext4, XFS, btrfs, APFS, NTFS)
PNG_COMPRESSION = 1  # cv2 zlib level; measured on a 3504x2336 RGB: level 1 0.53 s (8.9 MB), 3 0.83 s (8.2 MB), 6 2.8 s (7.7 MB)

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_EXIF_ORIENTATION_TAG = 0x0112
_MODES_BY_CHANNELS = {1: "gray", 2: "graya", 3: "rgb", 4: "rgba"}


# --------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class ImageItem:
    """One input image. ``key`` is the relative POSIX path without extension (``"sub/01_test"``)."""

    key: str
    path: Path
    # reached through a symbolic link (the file, or a folder above it below the scanned root): only such an
    # item can lie inside OUT, which may not be inside the root (runner.check_run_paths)
    linked: bool = field(default=False, compare=False)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def discover_images(root: Path, notes: list[str] | None = None) -> list[ImageItem]:
    """All supported images under ``root`` (recursive), sorted by key.

    Extensions match case-insensitively; hidden files and folders (name starting with ``.``) are skipped.
    An entry with an image's name that is not a readable regular file (a dangling or looping symbolic link,
    a FIFO, a socket) is kept: it fails as an item with its reason, never skipped in silence. Symlinked
    folders are followed once (loops are ignored): a folder reached both as itself and through a link is
    read under its own path, and one reached through several links under the first found, the shallowest
    link first and in name order at each depth, whatever order the file system lists them in (the keys, and so the outputs and degrade's seeds, do not depend on
    it). Two files with the same key (``a.png`` and ``a.JPG``) are a ``UsageError`` naming both, since their
    outputs would collide.

    ``notes``, when a list, receives one line each for what was passed over: the files with other
    extensions (counted by extension), the folders read under another path, and keys that differ only in
    letter case or Unicode normalisation (their outputs collide on a case-insensitive file system).
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"input folder not found: {root}")
    if not root.is_dir():
        raise UsageError(f"input is not a folder: {root}")

    found: dict[str, ImageItem] = {}
    root_s = str(root)
    prefix = root_s if root_s.endswith(os.sep) else root_s + os.sep
    seen_dirs: dict[str, str] = {}  # real path -> the path it was read under
    other: dict[str, int] = {}  # extension -> files not read
    again: list[tuple[str, str]] = []  # (folder, the path it was read under)
    # strings: os.scandir keeps each entry's path as root_s + sep + ... (pathlib would normalise "./"). The
    # folders themselves first, in name order; the ones reached through a link after them (campaign 17b F6)
    stack, linked = [(root_s, False)], []
    own = _fundus_tables(root)  # a stage's output folder read as input (enhance -> score): its own tables are no news
    while stack or linked:
        folder, via_link = stack.pop() if stack else linked.pop(0)
        real = os.path.realpath(folder)
        if real in seen_dirs:
            if seen_dirs[real] != folder:
                again.append((folder, seen_dirs[real]))
            continue
        seen_dirs[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise UsageError(f"cannot list folder {folder}: {exc.strerror or exc}") from exc
        subfolders = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    subfolders.append(entry)
                    continue
            except OSError:
                pass  # a symbolic link loop: an item below if it has an image's name (read_image says why it fails)
            stem, ext = os.path.splitext(entry.path)  # strings: pathlib costs more than the scan itself on 100,000 files
            if ext.lower() not in SUPPORTED_EXTENSIONS:
                if not (folder == root_s and entry.name in own):
                    kind = ext.lower() or "(none)"
                    other[kind] = other.get(kind, 0) + 1
                continue
            path = Path(entry.path)
            key = stem[len(prefix):].replace(os.sep, "/")  # entry paths are root_s + sep + ...
            if key in found:
                a, b = sorted([found[key].path, path])
                raise UsageError(
                    f"two files in {root} have the same key '{key}': {a} and {b}; rename or remove one"
                )
            found[key] = ImageItem(key, path, via_link or entry.is_symlink())
        stack += [(e.path, via_link) for e in reversed(subfolders) if not e.is_symlink()]
        linked += [(e.path, True) for e in subfolders if e.is_symlink()]
    if notes is not None:
        _discovery_notes(notes, found, other, again)
    return [found[key] for key in sorted(found)]


def fundus_manifest_head(manifest: Path) -> bytes | None:
    """The first 4 KiB of a manifest.json that fundus wrote, or None when the file is missing, unreadable or not
    fundus's (every manifest of fundus starts with its schema version and ``"tool": {"name": "fundus-pipeline"``;
    one of a 100,000-photograph run is tens of megabytes, so only its head is read)."""
    try:
        with open(manifest, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    return head if head.lstrip().startswith(b"{") and b'"name": "fundus-pipeline"' in head else None


#: The lines that open the lists ``runner.write_json_streamed`` writes after a manifest's head (one element a
#: line); at an indent of two spaces such a line can only be a key of the top-level object.
_STREAMED_LISTS = ('  "plan": [', '  "items": [')


def read_manifest_head(manifest: Path, *, errors: str = "strict") -> object:
    """The JSON of ``manifest`` without the lists written after its head (``plan``, ``items``: the rows of a
    100,000-photograph run, tens of megabytes as Python objects): its lines are read up to the first of those
    lists and the head closed there; keys after them, which fundus never writes, are not read. A file laid out
    otherwise (another tool's, edited by hand, cut before its lists) is read whole, as ``json.loads`` reads it:
    OSError and ValueError as it raises them. One whose head is whole and whose rows are cut reads: its head."""
    import json

    head: list[str] = []
    with open(manifest, encoding="utf-8", errors=errors) as f:
        for line in f:
            if line.rstrip("\r\n") in _STREAMED_LISTS and head and head[-1].rstrip().endswith(","):
                head[-1] = head[-1].rstrip()[:-1] + "\n"
                try:
                    return json.loads("".join(head) + "}")
                except ValueError:  # not a head after all: the file is read whole (one try: a file of many
                    head[-1] = head[-1].rstrip("\n") + ",\n"  # such lines had been parsed again at each, review 39 F2)
                    head.append(line)
                    head.extend(f)
                    break
            head.append(line)
    return json.loads("".join(head))


def fold_key(key: str) -> str:
    """``key`` as compared across letter case and Unicode normalisation (a name copied from macOS is NFD)."""
    return unicodedata.normalize("NFC", key).casefold()


def _fundus_tables(folder: Path) -> tuple[str, ...]:
    """``manifest.json`` and ``results.csv`` when ``folder`` holds a manifest that fundus wrote (campaign 27a F12:
    scoring an enhance folder noted them as files not read, every time), else ()."""
    return ("manifest.json", "results.csv") if fundus_manifest_head(folder / "manifest.json") is not None else ()


def _discovery_notes(notes: list[str], found: dict[str, ImageItem], other: dict[str, int], again: list[tuple[str, str]]) -> None:
    if other:
        n = sum(other.values())
        by = sorted(other.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{ext} {c}" for ext, c in by[:8]) + (", ..." if len(by) > 8 else "")
        notes.append(f"{n} file{'s' if n != 1 else ''} with other extensions not read ({shown}); "
                     f"read: {', '.join(SUPPORTED_EXTENSIONS)}")
    for folder, under in sorted(again)[:5]:
        notes.append(f"folder {folder} (reached through a symbolic link) not read again: it is {under}, read under that path")
    if len(again) > 5:
        notes.append(f"... and {len(again) - 5} more folders reached twice through symbolic links")
    folded: dict[str, list[str]] = {}
    for key in found:
        folded.setdefault(fold_key(key), []).append(key)
    clashes = sorted(sorted(keys) for keys in folded.values() if len(keys) > 1)
    for keys in clashes[:5]:
        shown = [repr(k) for k in keys]
        if len(set(shown)) < len(shown):  # NFC and NFD forms print alike: show their code points
            shown = [ascii(k) for k in keys]
        notes.append(f"keys {', '.join(shown)} differ only in letter case or Unicode normalisation: "
                     "their outputs would replace each other on a case-insensitive file system (macOS, Windows, exFAT)")
    if len(clashes) > 5:
        notes.append(f"... and {len(clashes) - 5} more keys that differ only in letter case or normalisation")


# --------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ImageMeta:
    """What was read. ``mode`` is the returned layout: gray (HxW), graya (HxWx2), rgb, rgba.

    ``palette`` is True for palette (indexed) images; with ``read_image(..., raw_palette=True)`` the
    array then holds the raw indices and ``mode`` is ``"gray"``. ``exif_orientation`` is the tag found
    in the file (already applied to the array), or None. ``colour_profile`` is the description of the
    embedded ICC profile whose colours were converted to sRGB (:func:`to_srgb`), or None.
    """

    format: str
    dtype: str
    bit_depth: int
    mode: str
    height: int
    width: int
    exif_orientation: int | None
    palette: bool
    colour_profile: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def apply_exif_orientation(arr: np.ndarray, orientation: int | None) -> np.ndarray:
    """Return ``arr`` (HxW[xC]) as it should be displayed for EXIF orientation 1..8."""
    if orientation is None or orientation == 1:
        return arr
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(int(orientation))
    return arr if op is None else np.ascontiguousarray(op(arr))


def _exif_orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # malformed EXIF must not make an otherwise fine image unreadable
        return None
    try:
        value = int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and 1 <= value <= 8 else None


def _png_exif_orientation(data: bytes) -> int | None:
    """Orientation from a PNG ``eXIf`` chunk, found by walking the chunk list (no pixel decoding)."""
    pos = len(_PNG_SIG)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            exif = Image.Exif()
            try:
                exif.load(data[pos + 8 : pos + 8 + length])
                value = int(exif.get(_EXIF_ORIENTATION_TAG) or 0)
            except Exception:
                return None
            return value if 1 <= value <= 8 else None
        if kind == b"IEND":
            break
        pos += 12 + length
    return None


def _check_size(path: Path, width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(f"{path}: image is too small ({width}x{height}); at least {MIN_SIDE}x{MIN_SIDE} is needed")


def _check_pixels(path: Path, width: int, height: int, depth: int = 1) -> None:
    """Refuse images over MAX_PIXELS from their header, before anything is decoded."""
    pixels = int(width) * int(height) * max(1, int(depth))
    if pixels > MAX_PIXELS:
        raise InputError(
            f"{path}: image is too large to decode safely ({width}x{height}"
            f"{f'x{depth}' if depth > 1 else ''} = {pixels} pixels, limit {MAX_PIXELS})"
        )


def _refuse_dtype(path: Path, what: str) -> InputError:
    return InputError(f"{path}: unsupported pixel type ({what}); only 8- and 16-bit images are supported")


def _pil_to_array(im: Image.Image, path: Path, raw_palette: bool) -> tuple[np.ndarray, bool]:
    """Decoded Pillow image -> (native array, is_palette)."""
    mode = im.mode
    if mode in ("P", "PA"):
        if raw_palette:
            return np.asarray(im.convert("P") if mode == "PA" else im), True
        has_alpha = mode == "PA" or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB")), True
    if mode == "1":
        return np.asarray(im.convert("L")), False
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(im), False
    if mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB")), False
    if mode == "RGBa":
        return np.asarray(im.convert("RGBA")), False
    if mode == "La":
        return np.asarray(im.convert("LA")), False
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16), False
    if mode == "F":
        raise InputError(f"{path}: floating-point images are not supported; convert it to 8- or 16-bit")
    raise _refuse_dtype(path, f"Pillow mode {mode}")


def _png_header(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk."""
    return data[24], data[25]


def _read_png(data: bytes, path: Path, im: Image.Image, raw_palette: bool) -> tuple[np.ndarray, bool]:
    try:
        verifier = _pil_open(data)
        verifier.verify()  # walks every chunk, checks CRCs, fails on a truncated stream
    except Exception as exc:
        raise InputError(f"{path}: truncated or corrupt PNG ({_short(exc)})") from exc
    bit_depth, colour_type = _png_header(data)
    if colour_type == 3:  # palette
        _pil_load(im, path, "PNG")
        return _pil_to_array(im, path, raw_palette)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InputError(f"{path}: truncated or corrupt PNG (decoder failed)")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        if colour_type == 4:  # gray+alpha: OpenCV expands it to BGRA with B == G == R
            arr = np.ascontiguousarray(np.stack([arr[..., 0], arr[..., 3]], axis=-1))
        else:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    if colour_type == 0 and arr.ndim == 3:  # gray with a tRNS entry is expanded by some builds
        arr = np.ascontiguousarray(arr[..., 0])
    return arr, False


def _pil_open(data: bytes) -> Image.Image:
    """``Image.open`` without Pillow's DecompressionBombWarning (89-179 MP): MAX_PIXELS is this module's
    limit, checked from the header; the warning went to stderr once per process for a legal photograph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_large(width: int, height: int) -> bool:
    from fundus_pipeline.bands import is_large

    return is_large(height, width)


def _read_large_jpeg(data: bytes, path: Path, im: Image.Image) -> np.ndarray:
    """A very large baseline RGB or gray JPEG, decoded by OpenCV straight into one array (Pillow would hold
    its own 4-byte-per-pixel copy and a bytes copy besides: three times the memory). Pillow first decodes
    it at 1/8 scale (``draft``), which reads the whole entropy-coded stream, so a truncated or corrupt
    file is refused as on the normal path."""
    probe = _pil_open(data)
    probe.draft(probe.mode, (max(1, probe.size[0] // 8), max(1, probe.size[1] // 8)))
    _pil_load(probe, path, "JPEG")
    probe.close()
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # no EXIF rotation: applied after
    if arr is None or arr.shape[:2] != (im.size[1], im.size[0]):
        raise InputError(f"{path}: truncated or corrupt JPEG")
    if arr.ndim == 3:
        cv2.cvtColor(arr, cv2.COLOR_BGR2RGB, dst=arr)
    return arr


def _pil_load(im: Image.Image, path: Path, fmt: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Exception as exc:
        raise InputError(f"{path}: truncated or corrupt {fmt} ({_short(exc)})") from exc


_TIFF_LOGGER = logging.getLogger("tifffile")
_quiet_lock = threading.Lock()
_quiet_depth = 0


def _drop_record(record: logging.LogRecord) -> bool:
    return False


@contextmanager
def _quiet_tiff_decoders():
    """Silence tifffile's logger (which otherwise prints e.g. "<TiffTag.fromfile> raised ..." through
    logging's last-resort handler) and Python warnings (Pillow's "Truncated File Read") while a TIFF is
    read: the reader reports problems with one InputError line."""
    global _quiet_depth
    with _quiet_lock:
        _quiet_depth += 1
        if _quiet_depth == 1:
            _TIFF_LOGGER.addFilter(_drop_record)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                _TIFF_LOGGER.removeFilter(_drop_record)


def _check_tiff_extent(path: Path, page, size: int) -> None:
    """Refuse a TIFF whose strips/tiles extend past the end of the file (truncated), before decoding
    (libtiff, used by the Pillow fallback, would print its own read errors on stderr)."""
    try:
        offsets, counts = page.dataoffsets, page.databytecounts
    except Exception:
        return
    for off, cnt in zip(offsets or (), counts or ()):
        if int(cnt) > 0 and int(off) + int(cnt) > size:
            raise InputError(f"{path}: truncated TIFF (pixel data extends past the end of the file)")


#: TIFF photometric interpretations read from tifffile's samples: MINISWHITE, MINISBLACK, RGB, PALETTE.
_TIFF_PHOTOMETRIC_READ = (0, 1, 2, 3)
_TIFF_PHOTOMETRIC_NAMES = {4: "mask", 5: "CMYK", 6: "YCbCr", 8: "CIELab", 9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv"}


def _read_tiff(data: bytes, path: Path, raw_palette: bool) -> tuple[np.ndarray, bool, int | None, bytes | None]:
    with _quiet_tiff_decoders():
        return _read_tiff_quiet(data, path, raw_palette)


def _read_tiff_quiet(data: bytes, path: Path, raw_palette: bool) -> tuple[np.ndarray, bool, int | None, bytes | None]:
    """(array, palette, EXIF orientation, ICC profile or None) of a TIFF's first page."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            page = tf.pages[0]
            _check_pixels(path, int(page.imagewidth), int(page.imagelength), int(getattr(page, "imagedepth", 1) or 1))
            photometric = int(page.photometric)
            planar = int(page.planarconfig)
            tag = page.tags.get(274)
            orientation = int(tag.value) if tag is not None else None
            tag = page.tags.get(34675)  # InterColorProfile
            icc = tag.value if tag is not None and isinstance(tag.value, bytes) and tag.value else None
            colormap = page.colormap if photometric == 3 else None
            extrasamples = tuple(page.extrasamples) if page.extrasamples is not None else ()
            bits, samples = int(page.bitspersample), int(page.samplesperpixel)
            _check_size(path, int(page.imagewidth), int(page.imagelength))
            _check_tiff_extent(path, page, len(data))
            if photometric not in _TIFF_PHOTOMETRIC_READ:
                # CMYK, YCbCr, CIELab, ...: tifffile gives the samples as stored (CMYK came back as RGB with K for
                # alpha); Pillow converts the 8-bit ones without extra samples to RGB
                space = _TIFF_PHOTOMETRIC_NAMES.get(photometric, f"photometric {photometric}")
                refused = InputError(f"{path}: {bits}-bit TIFF in the {space} colour space with {samples} samples is not "
                                     "supported; export it as grey or RGB (8-bit CMYK, YCbCr and CIELab without extra samples are read)")
                if bits != 8 or extrasamples:
                    raise refused
                try:
                    return _read_tiff_with_pillow(data, path, raw_palette)
                except InputError as e:  # Pillow cannot open this kind: say so, not "corrupt" (review 18 R2)
                    if "cannot identify image file" in str(e.__cause__ or ""):
                        raise refused from None
                    import PIL

                    if photometric == 6 and e.__cause__ is not None and int(PIL.__version__.split(".")[0]) < 13:
                        # an uncompressed YCbCr TIFF that Pillow 10-12 cannot decode, not a corrupt one (campaign 36c
                        # M-2; a corrupt file of another colour space stays "corrupt": review 36 L-1)
                        raise InputError(f"{path}: 8-bit YCbCr TIFF that Pillow {PIL.__version__} cannot decode "
                                         f"({_short(e.__cause__)}); Pillow 13 or later reads it; or export it as RGB") from None
                    raise
            try:
                arr = page.asarray()
            except Exception as exc:
                # e.g. LZW/Deflate need the optional 'imagecodecs' package: Pillow decodes those losslessly
                # for 8-bit and 16-bit-gray pages; anything else would be downcast, so refuse it.
                if bits == 8 or (samples == 1 and bits in (1, 16)):
                    return _read_tiff_with_pillow(data, path, raw_palette)
                raise InputError(f"{path}: cannot decode this TIFF ({_short(exc)})") from exc
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: truncated or corrupt TIFF ({_short(exc)})") from exc
    if orientation is not None and not 1 <= orientation <= 8:
        orientation = None

    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.kind == "f":
        raise InputError(
            f"{path}: floating-point TIFF ({arr.dtype}) is not supported; convert it to 8- or 16-bit"
        )
    if arr.dtype not in (np.uint8, np.uint16):
        raise _refuse_dtype(path, f"{arr.dtype}")
    if arr.ndim == 3 and planar == 2:  # separate planes: (S, H, W)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim > 3:
        arr = arr.reshape(arr.shape[-3:]) if np.prod(arr.shape[:-3]) == 1 else arr[(0,) * (arr.ndim - 3)]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if photometric == 0 and arr.ndim == 2:  # MINISWHITE
        arr = np.iinfo(arr.dtype).max - arr
    if colormap is not None and arr.ndim == 2:
        if raw_palette:
            return np.ascontiguousarray(arr), True, orientation, icc
        cmap = np.asarray(colormap)
        lut = cmap.T  # (N, 3), uint16 per TIFF spec
        if lut.max() <= 255:
            lut = lut.astype(np.uint8)
        else:
            lut = (lut >> 8).astype(np.uint8) if lut.dtype == np.uint16 else lut.astype(np.uint8)
        return np.ascontiguousarray(lut[np.clip(arr, 0, len(lut) - 1)]), True, orientation, icc
    if arr.ndim == 3 and (arr.shape[2] > 4 or (photometric in (0, 1) and arr.shape[2] > 2)):
        # multispectral or extra channels: no channel is dropped or taken for alpha in silence
        kind = "grey" if photometric in (0, 1) else "colour"
        raise InputError(f"{path}: TIFF with {arr.shape[2]} channels ({kind}, {len(extrasamples)} extra samples) is not supported; "
                         "export it as grey, grey+alpha, RGB or RGBA")
    return np.ascontiguousarray(arr), False, orientation, icc


def _read_tiff_with_pillow(data: bytes, path: Path, raw_palette: bool) -> tuple[np.ndarray, bool, int | None, bytes | None]:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im = _pil_open(data)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: image is too large to decode safely ({_short(exc)})") from exc
    except Exception as exc:
        # UnidentifiedImageError's text names the BytesIO object, a new address on each run: not in a message
        why = "Pillow cannot decode it" if isinstance(exc, UnidentifiedImageError) else _short(exc)
        raise InputError(f"{path}: truncated or corrupt TIFF ({why})") from exc
    _check_pixels(path, *im.size)
    _pil_load(im, path, "TIFF")
    arr, is_palette = _pil_to_array(im, path, raw_palette)
    icc = im.info.get("icc_profile")
    return arr, is_palette, _exif_orientation(im), icc if isinstance(icc, bytes) and icc else None


def read_image(path: Path, *, raw_palette: bool = False, info: dict | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read an image in its native dtype and layout; see the module docstring.

    Returns HxW (gray), HxWx2 (gray+alpha), HxWx3 (RGB) or HxWx4 (RGBA), uint8 or uint16, upright
    (EXIF orientation applied). Palette images are converted to RGB (RGBA with transparency) unless
    ``raw_palette`` is True, in which case the HxW index array is returned (``meta.palette`` True).
    Raises ``InputError`` with a one-line message for missing, empty, truncated, corrupt, too small
    (< 16 px on a side) or unsupported-dtype files. ``info``, if a dict, receives the file's ``sha256``
    (of the bytes decoded), ``size``, ``mtime_ns``, ``ctime_ns`` and ``ino``: the provenance of a result, at no
    extra read.
    """
    path = Path(path)
    try:
        if not path.exists():
            if path.is_symlink():
                raise InputError(f"{path}: symbolic link to a missing file (or a loop of links)")
            raise InputError(f"{path}: file not found")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file (a folder, FIFO, socket or device); not read")
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if info is not None:
        info.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data), mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                    ino=st.st_ino)
    if not data:
        raise InputError(f"{path}: empty file (0 bytes)")

    orientation: int | None = None
    if data[:4] in _TIFF_MAGIC:  # tifffile handles what Pillow cannot (16-bit RGB, planar, float: refused clearly)
        arr, is_palette, orientation, icc = _read_tiff(data, path, raw_palette)
        return _finish(path, "tiff", arr, is_palette, orientation, None if raw_palette else icc)

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im = _pil_open(data)
    except UnidentifiedImageError as exc:
        raise InputError(
            f"{path}: not a readable image (unknown or corrupt format; supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: image is too large to decode safely ({_short(exc)})") from exc
    except Exception as exc:
        raise InputError(f"{path}: corrupt image header ({_short(exc)})") from exc

    fmt = (im.format or "").upper()
    _check_size(path, *im.size)
    if fmt == "PNG" and data.startswith(_PNG_SIG):
        arr, is_palette = _read_png(data, path, im, raw_palette)
        orientation = _png_exif_orientation(data)
    elif fmt == "JPEG" and im.mode in ("RGB", "L") and _is_large(*im.size):
        orientation = _exif_orientation(im)
        arr, is_palette = _read_large_jpeg(data, path, im), False
    elif fmt in ("JPEG", "MPO", "BMP", "DIB", "GIF"):
        if fmt == "GIF":
            im.seek(0)
        _pil_load(im, path, "JPEG" if fmt == "MPO" else fmt)
        orientation = _exif_orientation(im) if fmt in ("JPEG", "MPO") else None
        arr, is_palette = _pil_to_array(im, path, raw_palette)
    elif fmt == "PPM":
        _pil_load(im, path, "PPM")  # detects truncation; Pillow would scale 16-bit to 8-bit, so decode with OpenCV
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise InputError(f"{path}: truncated or corrupt PPM")
        if arr.ndim == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        arr = _ppm_full_scale(arr, _ppm_maxval(data))
        is_palette = False
    else:
        raise InputError(
            f"{path}: unsupported image format {fmt or 'unknown'} (supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    icc = None if raw_palette else im.info.get("icc_profile")
    return _finish(path, "jpeg" if fmt == "MPO" else fmt.lower(), arr, is_palette, orientation, icc)


def _ppm_maxval(data: bytes) -> int | None:
    """The maxval of a P2/P3/P5/P6 header (the sample value that means full scale), None for other kinds."""
    if data[:2] not in (b"P2", b"P3", b"P5", b"P6"):
        return None
    tokens: list[bytes] = []
    i, n = 2, len(data)
    while len(tokens) < 3 and i < n:
        c = data[i : i + 1]
        if c == b"#":  # a comment runs to the end of its line
            while i < n and data[i : i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isspace():
            i += 1
        else:
            j = i
            while j < n and not data[j : j + 1].isspace() and data[j : j + 1] != b"#":
                j += 1
            tokens.append(data[i:j])
            i = j
    try:
        return int(tokens[2])
    except (IndexError, ValueError):
        return None


def _ppm_full_scale(arr: np.ndarray, maxval: int | None) -> np.ndarray:
    """Samples of a PPM whose maxval is not its type's full scale (12-bit data under maxval 4095, or a maxval
    below 255) stretched to the full range of the 8- or 16-bit type, as every viewer shows them; OpenCV
    returns the raw values. The bit depth stays the file's (8 bits up to maxval 255, 16 above)."""
    top = int(np.iinfo(arr.dtype).max)
    if not maxval or maxval >= top or maxval <= 0:
        return arr
    scaled = (np.minimum(arr.astype(np.uint64), maxval) * top * 2 + maxval) // (2 * maxval)  # rounded to nearest
    return scaled.astype(arr.dtype)


def _finish(
    path: Path, fmt: str, arr: np.ndarray, is_palette: bool, orientation: int | None, icc: bytes | None = None
) -> tuple[np.ndarray, ImageMeta]:
    if arr.dtype not in (np.uint8, np.uint16):
        raise _refuse_dtype(path, str(arr.dtype))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if channels not in _MODES_BY_CHANNELS:
        raise _refuse_dtype(path, f"{channels} channels")
    arr = apply_exif_orientation(arr, orientation)
    _check_size(path, arr.shape[1], arr.shape[0])
    arr, profile = to_srgb(arr, icc)
    if channels in (2, 4):
        arr = clear_transparent(arr, in_place=arr.flags.writeable and arr.flags.owndata)
    meta = ImageMeta(
        format=fmt,
        dtype=str(arr.dtype),
        bit_depth=8 * arr.dtype.itemsize,
        mode=_MODES_BY_CHANNELS[channels],
        height=int(arr.shape[0]),
        width=int(arr.shape[1]),
        exif_orientation=orientation,
        palette=bool(is_palette),
        colour_profile=profile,
    )
    return arr, meta


_SRGB_PROFILE = None


def to_srgb(arr: np.ndarray, icc: bytes | None) -> tuple[np.ndarray, str | None]:
    """(``arr`` in sRGB, the description of the profile converted from, or None). An 8-bit RGB or RGBA image
    whose embedded ICC profile is an RGB one other than sRGB (Adobe RGB, Display P3, ProPhoto, a camera's) is
    converted to sRGB, as a colour-managed viewer shows it (Pillow's ImageCms, LittleCMS, perceptual intent;
    alpha kept): read as it was, an Adobe RGB photograph's red was 13 to 22 levels off, and its output shown
    that far from its input (campaign 17b F3). Left as they are: images without a profile, or with an sRGB
    one (told by its description naming sRGB: a linear-light profile named so is taken for sRGB too, and an
    sRGB profile with another name is converted, which moves a value by about one level), grey ones, 16-bit ones and very large ones (``LARGE_PIXELS``), and a
    profile LittleCMS cannot read (as viewers do). Outputs carry no profile: they are sRGB."""
    global _SRGB_PROFILE
    if not icc or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4) or _is_large(arr.shape[1], arr.shape[0]):
        return arr, None
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = " ".join((ImageCms.getProfileDescription(src) or "").split())
        if "srgb" in desc.lower().replace(" ", "") or src.profile.xcolor_space.strip() != "RGB":
            return arr, None
        if _SRGB_PROFILE is None:
            _SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        rgb = ImageCms.profileToProfile(Image.fromarray(np.ascontiguousarray(arr[..., :3])), src, _SRGB_PROFILE, outputMode="RGB")
    except Exception:  # ImageCms.PyCMSError, an unreadable or unusable profile: shown as it is, as viewers do
        return arr, None
    out = np.array(rgb)
    if arr.shape[2] == 4:
        out = np.dstack([out, arr[..., 3]])
    return out, desc or "unnamed ICC profile"


def clear_transparent(arr: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Grey+alpha or RGBA ``arr`` with its fully transparent pixels (alpha 0) black: what they show on a black
    background. An exporter may leave any colour under alpha 0 (white, say, around the field of view), which no
    viewer shows and which is not the photograph's: read as it is, a white surround hid the field of view from
    the FOV estimate and made the grader reject the photograph (campaign 17b F2). The alpha plane is kept, and
    partly transparent pixels are left as they are. A copy only when a pixel changes, unless ``in_place``
    (the reader's own decoded array: a 12000 x 9000 RGBA photograph is not held twice)."""
    clear = arr[..., -1] == 0
    if not clear.any():
        return arr
    if not in_place:
        arr = arr.copy()
    np.copyto(arr[..., :-1], 0, where=clear[..., None])  # no index arrays (a boolean index built 0.9 GB of them)
    return arr


# --------------------------------------------------------------------------------------------- float
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 weights of R, G, B: every luminance in fundus


def _maxval(dtype: str | np.dtype) -> int:
    return int(np.iinfo(np.dtype(dtype)).max)


def to_float_rgb(arr: np.ndarray, meta: ImageMeta | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 HxWx3 RGB in [0,1], alpha plane in the native dtype or None) of a uint8 or uint16 image as
    :func:`read_image` gives it (HxW grey, HxWx2 grey+alpha, HxWx3, HxWx4), each value divided by the
    dtype's maximum. Grey is replicated. ``meta`` is not needed (kept for the callers that pass it)."""
    arr = np.asarray(arr)
    if arr.dtype not in (np.uint8, np.uint16):  # int64 divided by 2**63 - 1 would be an all-black image
        raise TypeError(f"to_float_rgb takes a uint8 or uint16 image (read_image's), got dtype {arr.dtype}"
                        + ("; a float image in [0, 1] needs no conversion" if arr.dtype.kind == "f" else ""))
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"unsupported image shape {arr.shape}")
    maxval = float(_maxval(arr.dtype))
    alpha = None
    if arr.ndim == 2:
        color = arr[..., None]
    elif arr.shape[2] == 2:
        color, alpha = arr[..., :1], arr[..., 1].copy()
    elif arr.shape[2] == 3:
        color = arr
    elif arr.shape[2] == 4:
        color, alpha = arr[..., :3], arr[..., 3].copy()
    else:
        raise ValueError(f"unsupported image shape {arr.shape}")
    rgb = color.astype(np.float32) / np.float32(maxval)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return rgb, alpha


def from_float_rgb(
    rgb: np.ndarray, meta: ImageMeta, alpha: np.ndarray | None, *, truncate: bool = False, consume: bool = False
) -> np.ndarray:
    """Back to ``meta``'s dtype and channel layout.

    Gray layouts take the ITU-R BT.601 luminance (0.299 R + 0.587 G + 0.114 B); ``alpha`` is re-attached
    unchanged (if ``alpha`` is None the output has no alpha channel). ``truncate=True`` floors
    ``x * maxval`` (the Cofe-Net generator's integer cast), otherwise rounds; values within rounding of [0, 1]
    (``degradation.checks.RANGE_TOLERANCE``) are clipped.
    ``consume=True``: ``rgb`` (float32) is not needed afterwards and is used as scratch (same result).
    ``rgb`` is float HxWx3 (or HxW, HxWx1 grey) in [0, 1], finite: an integer, [0, 255], channels-first or NaN
    array is a ``TypeError`` or ``ValueError`` (it had been clipped to a white or black image; campaign 27b F4).
    """
    from degradation.checks import unit_image

    a = np.asarray(rgb)
    grey = a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 1)
    unit_image(a.reshape(*a.shape[:2], 1) if grey else a, "rgb", channels=1 if grey else 3)
    rgb = np.asarray(a, dtype=np.float32)
    if rgb.ndim == 3 and rgb.shape[2] == 1:
        rgb = rgb[..., 0]
    dtype = np.dtype(meta.dtype)
    maxval = _maxval(dtype)
    if meta.mode in ("gray", "graya"):
        plane = rgb if rgb.ndim == 2 else rgb @ LUMA
        if rgb.ndim == 3:  # a grey pixel keeps its value: in float32 the weights sum to just under 1, and a floor
            grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])  # lost a level on 11 of 256 values
            np.copyto(plane, rgb[..., 0], where=grey)
    else:
        plane = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb
    if consume and plane.flags.writeable:
        scaled = np.multiply(plane, np.float32(maxval), out=plane)
        (np.floor if truncate else np.rint)(scaled, out=scaled)
        out = np.clip(scaled, 0, maxval, out=scaled).astype(dtype)
    else:
        scaled = plane * np.float32(maxval)
        scaled = np.floor(scaled) if truncate else np.rint(scaled)
        out = np.clip(scaled, 0, maxval).astype(dtype)
    if alpha is not None and meta.mode in ("graya", "rgba"):
        a = np.asarray(alpha)
        if a.shape != out.shape[:2]:
            raise ValueError(f"alpha shape {a.shape} does not match image {out.shape[:2]}")
        if a.dtype != dtype:  # rescale an alpha plane given in another integer depth
            a = np.clip(np.rint(a.astype(np.float64) * (maxval / _maxval(a.dtype))), 0, maxval).astype(dtype)
        out = np.concatenate([out if out.ndim == 3 else out[..., None], a[..., None]], axis=2)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------- writing
def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a hidden temp file in the same folder and ``os.replace``.

    Creates parent folders. Never leaves a partial file under the final name; removes the temp file on
    error. ``OSError`` becomes ``FundusError("cannot write <path>: <reason>")``.
    """
    with open_atomic(path, binary=True) as fh:
        fh.write(data)


@contextlib.contextmanager
def open_atomic(path: Path, *, binary: bool = False, errors: str = "surrogateescape"):
    """A file object that becomes ``path`` when the ``with`` block ends without an error (a hidden temp
    file in the same folder, fsynced, then ``os.replace``): what ``write_bytes_atomic`` does, for files
    written piece by piece (a large manifest or table streamed row by row, never held whole in memory).
    Text mode: UTF-8 with surrogate escapes (``errors``), ``\n`` line ends. ``OSError`` becomes ``FundusError``."""
    path = Path(path)
    tmp = path.with_name(_temp_name(path.name, uuid.uuid4().hex[:12]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            fh = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", errors=errors, newline="\n")
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    except OSError as exc:
        if no_space(exc.errno):
            raise DiskFullError(f"cannot write {path}: {exc.strerror or exc}",
                                hint="free space (or raise the file-size limit, ulimit -f), then rerun (a stage or `fundus run` continues with --resume)") from exc
        raise FundusError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _temp_name(name: str, tag: str) -> str:
    """``.{name}.{tag}.tmp``, with ``name`` cut so the whole fits NAME_MAX bytes in the filesystem
    encoding (a legal 255-byte name plus 18 characters of decoration would not). Still matches ``.*.tmp``."""
    tmp = f".{name}.{tag}.tmp"
    raw = os.fsencode(tmp)
    if len(raw) <= NAME_MAX:
        return tmp
    budget = NAME_MAX - (len(raw) - len(os.fsencode(name)))
    cut = os.fsencode(name)[: max(0, budget)]
    short = cut.decode(sys.getfilesystemencoding(), "ignore")  # drops a multi-byte character cut in half
    while len(os.fsencode(f".{short}.{tag}.tmp")) > NAME_MAX and short:
        short = short[:-1]
    return f".{short}.{tag}.tmp"


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def _encode_png_gray_alpha(arr: np.ndarray, level: int) -> bytes:
    """Minimal PNG encoder for gray+alpha (colour type 4), which OpenCV cannot write."""
    h, w, _ = arr.shape
    depth = 8 * arr.dtype.itemsize
    rows = arr.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([depth, 4, 0, 0, 0])
    return _PNG_SIG + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, level)) + _png_chunk(b"IEND", b"")


def encode_png(arr: np.ndarray, *, compression: int = PNG_COMPRESSION) -> bytes:
    """PNG bytes for an RGB(A)/gray(+alpha) uint8/uint16 array (bool is written as 0/255)."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG output must be uint8 or uint16, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise ValueError(f"PNG output must be HxW, HxWx2, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"PNG output must not be empty, got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 2:
        return _encode_png_gray_alpha(arr, compression)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR if arr.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def write_image_atomic(path: Path, arr: np.ndarray) -> tuple[int, str]:
    """Write ``arr`` as a PNG (the only output format: lossless, 8/16-bit) atomically; see write_bytes_atomic.
    Returns the file's size in bytes and the sha256 of the bytes written (the row's output record). An image
    smaller than ``MIN_SIDE`` on a side is refused (``ValueError``), as :func:`read_image` would refuse it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"cannot write {path}: only .png output is supported")
    shape = np.shape(arr)
    if len(shape) >= 2 and min(shape[:2]) < MIN_SIDE:
        raise ValueError(f"cannot write {path}: the image is {shape[1]}x{shape[0]}; read_image needs at least {MIN_SIDE}x{MIN_SIDE}")
    data = encode_png(arr)
    write_bytes_atomic(path, data)
    return len(data), hashlib.sha256(data).hexdigest()
