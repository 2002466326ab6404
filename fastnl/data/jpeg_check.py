"""Corrupt entropy-coded JPEG data, which Pillow decodes without a word.

libjpeg reports garbled-but-complete data ("Corrupt JPEG data: 238 extraneous bytes before
marker 0xd9", "... premature end of data segment", "... bad Huffman code") as *warnings* and
goes on, filling the damaged blocks with garbage. Pillow's decoder discards every libjpeg
warning (its ``output_message`` is a no-op), so ``Image.open(...).load()`` and ``verify()``
accept such a frame. :func:`corrupt_data` runs the same libjpeg (the one bundled with Pillow,
else the system's ``libjpeg.so.62``) through ctypes over the whole entropy-coded data
(``jpeg_read_coefficients``: Huffman decoding without the inverse DCT) and returns the first
warning libjpeg gives, or None.

Call it on data Pillow has already decoded: fatal libjpeg errors (which end in
``error_exit``) are then ruled out. The structures are those of the libjpeg 6.2 ABI on LP64
platforms (``sizeof(jpeg_decompress_struct) == 632``, ``num_warnings`` at byte 128 of
``jpeg_error_mgr``); elsewhere :func:`available` says why the check cannot run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading

_DECOMPRESS_SIZE = 632  # sizeof(struct jpeg_decompress_struct), libjpeg 6.2 ABI, LP64
_ERROR_MGR_SIZE = 168  # sizeof(struct jpeg_error_mgr)
_ERROR_EXIT, _OUTPUT_MESSAGE, _FORMAT_MESSAGE = 0, 16, 24  # offsets of its function pointers
_NUM_WARNINGS = 128  # offset of jpeg_error_mgr.num_warnings (a long)
_MSG_LENGTH = 200  # JMSG_LENGTH_MAX
_JPEG_LIB_VERSION = 62

_VOID_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_FORMAT_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)

_lock = threading.Lock()
_state: dict = {}


def _message_buffer(cinfo: int) -> int:
    err = ctypes.c_void_p.from_address(cinfo).value  # cinfo->err is the first field
    return err + _ERROR_MGR_SIZE  # our buffer follows the error manager


@_VOID_FN
def _output_message(cinfo):
    """Called by libjpeg's emit_message for the first warning: keep its text."""
    err = ctypes.c_void_p.from_address(cinfo).value
    fmt = _FORMAT_FN(ctypes.c_void_p.from_address(err + _FORMAT_MESSAGE).value)
    fmt(cinfo, _message_buffer(cinfo))


@_VOID_FN
def _error_exit(cinfo):
    """A fatal libjpeg error. It cannot happen on data Pillow decoded; libjpeg must not get
    control back, so say what happened in one line and end the process."""
    _output_message(cinfo)
    text = ctypes.string_at(_message_buffer(cinfo)).decode("latin-1")
    sys.stderr.write(f"fastnl: libjpeg failed while checking a frame Pillow had decoded: {text}\n")
    sys.stderr.flush()
    os._exit(2)


def _library_candidates() -> list[str]:
    import PIL

    here = os.path.dirname(PIL.__file__)
    found = []
    for pattern in ("../pillow.libs/libjpeg*.so*", ".dylibs/libjpeg*.dylib", "../Pillow.libs/libjpeg*.so*"):
        found += sorted(glob.glob(os.path.join(here, pattern)))
    system = ctypes.util.find_library("jpeg")
    if system:
        found.append(system)
    found.append("libjpeg.so.62")
    return found


def _load():
    if ctypes.sizeof(ctypes.c_long) != 8 or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None, "the libjpeg structure layout is known for LP64 platforms only"
    from PIL import features

    if not features.check_codec("jpg"):
        return None, "Pillow has no JPEG support"
    reasons = []
    for path in _library_candidates():
        name = os.path.basename(path)
        if ".so." in name and not name.split(".so.", 1)[1].startswith("62"):
            reasons.append(f"{path}: not the libjpeg 6.2 ABI")
            continue
        try:
            lib = ctypes.CDLL(path)
            for fn in ("jpeg_std_error", "jpeg_CreateDecompress", "jpeg_mem_src", "jpeg_read_header",
                       "jpeg_read_coefficients", "jpeg_finish_decompress", "jpeg_destroy_decompress"):
                getattr(lib, fn)
        except (OSError, AttributeError) as err:
            reasons.append(f"{path}: {err}")
            continue
        lib.jpeg_std_error.argtypes = [ctypes.c_void_p]
        lib.jpeg_std_error.restype = ctypes.c_void_p
        lib.jpeg_CreateDecompress.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        lib.jpeg_mem_src.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong]
        lib.jpeg_read_header.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.jpeg_read_coefficients.argtypes = [ctypes.c_void_p]
        lib.jpeg_read_coefficients.restype = ctypes.c_void_p
        lib.jpeg_finish_decompress.argtypes = [ctypes.c_void_p]
        lib.jpeg_destroy_decompress.argtypes = [ctypes.c_void_p]
        return lib, None
    return None, "no libjpeg 6.2 library found (" + "; ".join(reasons) + ")"


def _library():
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["reason"] = _load()
    return _state["lib"]


def available() -> str | None:
    """None when :func:`corrupt_data` can run here, else the reason it cannot."""
    _library()
    return _state["reason"]


# SOF markers of the Huffman- and arithmetic-coded DCT processes (baseline, extended,
# progressive), the ones jpeg_read_coefficients reads; lossless and hierarchical JPEGs are left
# alone (coefficient access is not supported for them: libjpeg would raise a fatal error).
_DCT_SOF = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}


def _frame_type(data: bytes) -> int | None:
    """The SOF marker (0xC0..0xCF) of a JPEG's frame header, found by walking the marker
    segments from SOI; None when ``data`` is no JPEG or the header cannot be walked."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def corrupt_data(data: bytes) -> str | None:
    """The first "Corrupt JPEG data" warning libjpeg gives while decoding ``data`` (the
    whole entropy-coded stream), or None: no warning, not a DCT-coded JPEG, or the check is
    unavailable here. ``data`` must be an image that Pillow has decoded without an error."""
    lib = _library()
    if lib is None or _frame_type(data) not in _DCT_SOF:
        return None
    err = ctypes.create_string_buffer(_ERROR_MGR_SIZE + _MSG_LENGTH)
    cinfo = ctypes.create_string_buffer(_DECOMPRESS_SIZE)
    lib.jpeg_std_error(err)
    base = ctypes.addressof(err)
    ctypes.c_void_p.from_address(base + _ERROR_EXIT).value = ctypes.cast(_error_exit, ctypes.c_void_p).value
    ctypes.c_void_p.from_address(base + _OUTPUT_MESSAGE).value = ctypes.cast(
        _output_message, ctypes.c_void_p).value
    ctypes.c_void_p.from_address(ctypes.addressof(cinfo)).value = base  # cinfo.err
    lib.jpeg_CreateDecompress(cinfo, _JPEG_LIB_VERSION, _DECOMPRESS_SIZE)
    try:
        lib.jpeg_mem_src(cinfo, data, len(data))
        lib.jpeg_read_header(cinfo, 1)
        lib.jpeg_read_coefficients(cinfo)
        lib.jpeg_finish_decompress(cinfo)
    finally:
        lib.jpeg_destroy_decompress(cinfo)
    if ctypes.c_long.from_address(base + _NUM_WARNINGS).value == 0:
        return None
    return ctypes.string_at(base + _ERROR_MGR_SIZE).decode("latin-1") or "Corrupt JPEG data"
