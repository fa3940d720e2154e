"""A small memory-mappable container of named numpy arrays (the bundle's ``lm.bin``
and ``memory.bin``).

Layout: the magic ``FMARRAY1``, a little-endian uint64 header length, a UTF-8 JSON
header ``{"meta": {...}, "arrays": {name: {"dtype", "shape", "offset"}}}`` written
with sorted keys, then each array's raw bytes at a 64-byte aligned offset. Writer
and reader live here together so they cannot drift; the same inputs give the same
bytes (no timestamps, fixed order), so a re-built bundle adds no new blob to git.

The reader maps the file read-only: pages are read from the SD card only when a
lookup touches them, and the arrays cost no heap.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

MAGIC = b"FMARRAY1"
ALIGN = 64
# Only plain little-endian numeric types: nothing that needs pickle.
ALLOWED_DTYPES = {"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8"}


class ArraysFileError(ValueError):
    """The file is not a valid arrays container; the message names the file."""


def write_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
    """Write ``arrays`` (in the given order) and ``meta`` to ``path``; return its size."""
    table: dict[str, dict] = {}
    blobs: list[tuple[int, bytes]] = []
    # Offsets depend on the header length, which depends on the offsets: lay out
    # with a generous fixed header size first, then pad the header to it.
    header_room = 0
    for _ in range(3):
        offset = _align(16 + header_room)
        table, blobs = {}, []
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
            array = array.astype(dtype, copy=False)
            if dtype.str not in ALLOWED_DTYPES:
                raise ValueError(f"array {name!r}: dtype {dtype.str} is not allowed")
            table[name] = {"dtype": dtype.str, "shape": list(array.shape), "offset": offset}
            blobs.append((offset, array.tobytes()))
            offset = _align(offset + array.nbytes)
        header = json.dumps({"meta": meta, "arrays": table}, ensure_ascii=False, sort_keys=True).encode("utf-8")
        if len(header) <= header_room:
            break
        header_room = _align(len(header) + 256)
    header = header.ljust(header_room, b" ")
    with open(path, "wb") as handle:
        handle.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for offset, blob in blobs:
            handle.write(b"\0" * (offset - handle.tell()))
            handle.write(blob)
        end = handle.tell()
    return end


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ArraysFile:
    """A read-only mapping of an arrays container: ``meta`` and ``array(name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                size = self.path.stat().st_size
                if size < 16:
                    raise ArraysFileError(f"{self.path}: too short to be an arrays file ({size} bytes)")
                self._mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            # Lookups jump around the file (binary searches): without this each page
            # fault reads ahead ~128 KB around it, and after 100 queries the service
            # had ~50 MB more of the files resident than it ever reads (measured).
            if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                self._mm.madvise(mmap.MADV_RANDOM)
        except OSError as exc:
            raise ArraysFileError(f"{self.path}: cannot read it ({exc})") from exc
        if self._mm[:8] != MAGIC:
            raise ArraysFileError(f"{self.path}: not an arrays file (bad magic {bytes(self._mm[:8])!r})")
        (length,) = struct.unpack("<Q", self._mm[8:16])
        if 16 + length > size:
            raise ArraysFileError(f"{self.path}: header of {length} bytes runs past the end of the file")
        try:
            header = json.loads(self._mm[16 : 16 + length].decode("utf-8"))
            self.meta: dict = header["meta"]
            self._table: dict = header["arrays"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArraysFileError(f"{self.path}: unreadable header ({exc})") from exc
        for name, entry in self._table.items():
            try:
                dtype = np.dtype(entry["dtype"])
                count = int(np.prod(entry["shape"], dtype=np.int64))
                offset = int(entry["offset"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ArraysFileError(f"{self.path}: array {name!r} has a bad entry ({exc})") from exc
            if entry["dtype"] not in ALLOWED_DTYPES:
                raise ArraysFileError(f"{self.path}: array {name!r} has dtype {entry['dtype']}, not allowed")
            if offset < 16 + length or offset + count * dtype.itemsize > size:
                raise ArraysFileError(f"{self.path}: array {name!r} lies outside the file (truncated?)")

    def names(self) -> list[str]:
        """Names of the arrays in the file."""
        return list(self._table)

    def array(self, name: str) -> np.ndarray:
        """The named array, a read-only view of the mapped file."""
        try:
            entry = self._table[name]
        except KeyError:
            raise ArraysFileError(f"{self.path}: has no array {name!r}") from None
        dtype = np.dtype(entry["dtype"])
        count = int(np.prod(entry["shape"], dtype=np.int64))
        flat = np.frombuffer(self._mm, dtype=dtype, count=count, offset=int(entry["offset"]))
        return flat.reshape(entry["shape"])

    def view(self, name: str) -> memoryview:
        """The named 1-D array as a memoryview: indexing it gives Python ints fast
        (``bisect`` on it runs in C, no numpy call per step)."""
        entry = self._table[name]
        dtype = np.dtype(entry["dtype"])
        start = int(entry["offset"])
        count = int(np.prod(entry["shape"], dtype=np.int64))
        raw = memoryview(self._mm)[start : start + count * dtype.itemsize]
        return raw.cast({1: "B", 2: "H", 4: "I", 8: "Q"}[dtype.itemsize]) if dtype.kind == "u" else raw.cast(dtype.char)

    def span(self, name: str) -> tuple[mmap.mmap, int, int]:
        """(the mapped file, byte offset, byte length) of the named array: slicing the
        mmap directly gives ``bytes`` with one copy, the fastest access from Python."""
        entry = self._table[name]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        return self._mm, int(entry["offset"]), count * np.dtype(entry["dtype"]).itemsize

    def close(self) -> None:
        """Unmap the file (arrays taken from it must be copies by now)."""
        self._mm.close()

    def bytes_of(self, name: str) -> bytes:
        """The raw bytes of the named array (for text blobs)."""
        array = self.array(name)
        return array.tobytes()


def open_arrays(path: str | Path, expected_format: str | tuple[str, ...], error: type[Exception]) -> ArraysFile:
    """Open an arrays file whose ``meta["format"]`` must be ``expected_format`` (or one of
    them); any problem is raised as ``error`` with a message naming the file."""
    try:
        file = ArraysFile(path)
    except ArraysFileError as exc:
        raise error(str(exc)) from exc
    accepted = (expected_format,) if isinstance(expected_format, str) else expected_format
    if file.meta.get("format") not in accepted:
        raise error(f"{path}: format {file.meta.get('format')!r} is not {' or '.join(map(repr, accepted))}")
    return file
