"""Jane Austen's six novels, read from the Debian package ``r-cran-janeaustenr``.

The package ships the novels as an R lazy-load database: ``Rdata.rdx`` is a gzip-compressed,
R-serialized index that maps each object name to an ``(offset, length)`` block of ``Rdata.rdb``;
each block is a 4-byte big-endian uncompressed length followed by compressed data, which is itself
an R-serialized character vector with one element per line of the novel.

This module reads that format with the standard library only (``zlib``/``gzip`` + ``struct``),
implementing the subset of R's XDR serialization that the files use (see R's
``src/main/serialize.c``). Nothing is downloaded at run time; :func:`find_austen_rdb` says how to
get the file when it is missing.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import logging
import lzma
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from kvpack.paths import cache_root

__all__ = [
    "AUSTEN_BOOKS",
    "RSymbol",
    "RVector",
    "austen_books",
    "austen_text",
    "find_austen_rdb",
    "read_lazyload_db",
    "unserialize",
]

logger = logging.getLogger(__name__)

#: Object names in the janeaustenr database, in the package's (alphabetical) order.
AUSTEN_BOOKS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)

_RDB_RELPATH = Path("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
_SYSTEM_RDB = Path("/") / _RDB_RELPATH
_ENV_RDB = "KVPACK_AUSTEN_RDB"

# --- R serialization constants (R src/main/serialize.c, Rinternals.h) -----------------------------

_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP = 0, 1, 2, 9, 10
_INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _VECSXP, _EXPRSXP, _RAWSXP = 13, 14, 15, 16, 19, 20, 24
_REFSXP, _NILVALUE_SXP = 255, 254  # serialize.c pseudo-types

_IS_OBJECT_BIT = 1 << 8
_HAS_ATTR_BIT = 1 << 9
_HAS_TAG_BIT = 1 << 10
# CHARSXP encoding flags live in the "levels" field (flags >> 12).
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6

_NA_INTEGER = -(2**31)
_NA_STRING_LENGTH = -1


class RSymbol(str):
    """An R symbol (``SYMSXP``), e.g. an attribute or list tag name; behaves as its ``str``."""


class RVector(list):
    """An R atomic vector or generic list, as a Python ``list`` plus R metadata.

    Attributes:
        sexptype: The R ``SEXPTYPE`` code (16 character, 13 integer, 19 list, ...).
        attributes: R attributes by name, e.g. ``{"names": RVector([...])}``; empty if none.

    Element types: character -> ``str`` or ``None`` (``NA``); integer -> ``int`` or ``None``;
    logical -> ``bool`` or ``None``; double -> ``float`` (``NA`` is a NaN); list -> parsed items.
    """

    def __init__(self, values: list, sexptype: int, attributes: dict[str, Any] | None = None):
        super().__init__(values)
        self.sexptype = sexptype
        self.attributes = attributes if attributes is not None else {}

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a plain list, or ``None`` if the vector has none."""
        names = self.attributes.get("names")
        return list(names) if names is not None else None


class _XdrReader:
    """Reads one R-serialized object in XDR ('X\\n') format from ``data``."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []  # REFSXP targets (symbols, environments), 1-based in the stream
        self.native_encoding = "utf-8"

    # -- primitives --
    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(
                f"truncated R serialization: wanted {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        length = self._int()
        if length == -1:  # long vector: two more ints, upper and lower 32 bits
            upper, lower = struct.unpack(">II", self._take(8))
            length = (upper << 32) + lower
        return length

    # -- header --
    def read_header(self) -> None:
        magic = self._take(2)
        if magic != b"X\n":
            raise ValueError(f"unsupported R serialization format {magic!r}: only XDR ('X\\n') is implemented")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            name_length = self._int()
            encoding = self._take(name_length).decode("ascii")
            self.native_encoding = "utf-8" if encoding.upper() in ("UTF-8", "UTF8") else encoding
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}: expected 2 or 3")

    # -- items --
    def read_item(self) -> Any:
        flags = self._int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & _HAS_ATTR_BIT)
        has_tag = bool(flags & _HAS_TAG_BIT)

        if sexptype in (_NILVALUE_SXP, _NILSXP):
            return None
        if sexptype == _REFSXP:
            index = flags >> 8 or self._int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"bad R reference index {index} ({len(self.refs)} known)")
            return self.refs[index - 1]
        if sexptype == _SYMSXP:
            symbol = RSymbol(self.read_item() or "")  # printname is a CHARSXP
            self.refs.append(symbol)
            return symbol
        if sexptype == _LISTSXP:
            return self._read_pairlist(has_attr, has_tag)
        if sexptype == _CHARSXP:
            value = self._read_charsxp(levels)
            if has_attr:  # written by old R versions only; R itself ignores it
                self.read_item()
            return value

        if sexptype == _STRSXP:
            values: list = [self._read_string_element() for _ in range(self._length())]
        elif sexptype in (_VECSXP, _EXPRSXP):
            values = [self.read_item() for _ in range(self._length())]
        elif sexptype == _INTSXP:
            n = self._length()
            values = [None if v == _NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))]
        elif sexptype == _LGLSXP:
            n = self._length()
            values = [None if v == _NA_INTEGER else bool(v) for v in struct.unpack(f">{n}i", self._take(4 * n))]
        elif sexptype == _REALSXP:
            n = self._length()
            values = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif sexptype == _CPLXSXP:
            n = self._length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            values = [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
        elif sexptype == _RAWSXP:
            values = list(self._take(self._length()))
        else:
            raise ValueError(
                f"unsupported R SEXPTYPE {sexptype} at offset {self.pos - 4}: this reader handles "
                "NULL, symbols, pairlists, and character/integer/logical/double/complex/raw/list vectors"
            )
        attributes = self._attributes_to_dict(self.read_item()) if has_attr else {}
        return RVector(values, sexptype, attributes)

    def _read_pairlist(self, has_attr: bool, has_tag: bool) -> list[tuple[str | None, Any]]:
        """A pairlist as ``[(tag, value), ...]``; read iteratively to avoid deep recursion."""
        cells: list[tuple[str | None, Any]] = []
        while True:
            if has_attr:
                self.read_item()  # attributes of a pairlist cell: never needed here
            tag = self.read_item() if has_tag else None
            cells.append((tag, self.read_item()))
            flags = self._int()
            sexptype = flags & 0xFF
            if sexptype != _LISTSXP:  # the CDR is not another cell: read it and stop
                self.pos -= 4
                tail = self.read_item()
                if tail is not None:
                    raise ValueError("improper R pairlist (CDR is not NULL)")
                return cells
            has_attr = bool(flags & _HAS_ATTR_BIT)
            has_tag = bool(flags & _HAS_TAG_BIT)

    @staticmethod
    def _attributes_to_dict(pairlist: Any) -> dict[str, Any]:
        if pairlist is None:
            return {}
        return {str(tag): value for tag, value in pairlist}

    def _read_string_element(self) -> str | None:
        flags = self._int()
        if flags & 0xFF != _CHARSXP:
            raise ValueError(f"character vector element has SEXPTYPE {flags & 0xFF}, expected CHARSXP")
        value = self._read_charsxp(flags >> 12)
        if flags & _HAS_ATTR_BIT:
            self.read_item()
        return value

    def _read_charsxp(self, levels: int) -> str | None:
        length = self._int()
        if length == _NA_STRING_LENGTH:
            return None
        raw = self._take(length)
        if levels & (_UTF8_MASK | _ASCII_MASK):
            encoding = "utf-8"
        elif levels & _LATIN1_MASK:
            encoding = "latin-1"
        elif levels & _BYTES_MASK:
            return raw.decode("utf-8", errors="surrogateescape")
        else:
            encoding = self.native_encoding
        return raw.decode(encoding)


def unserialize(data: bytes) -> Any:
    """Parse one R object serialized in XDR format (``serialize(x, NULL)`` / ``saveRDS`` payload).

    Args:
        data: The uncompressed bytes, starting with the ``b"X\\n"`` header (version 2 or 3).

    Returns:
        ``None`` for ``NULL``; an :class:`RVector` for vectors and lists (with ``.attributes``);
        an :class:`RSymbol` for symbols; ``[(tag, value), ...]`` for pairlists.

    Raises:
        ValueError: The data is truncated, not XDR, or uses a construct outside the supported
            subset (closures, environments with frames, ALTREP, bytecode, ...).
    """
    reader = _XdrReader(data)
    reader.read_header()
    return reader.read_item()


def _decompress_block(block: bytes, compression: int) -> bytes:
    """Decode one ``Rdata.rdb`` block (R's ``lazyLoadDBfetch`` layout)."""
    (expected_length,) = struct.unpack(">I", block[:4])
    if compression == 1:
        payload = zlib.decompress(block[4:])
    elif compression in (2, 3):
        # 5th byte names the codec: 'Z' zlib, '2' bzip2, 'X' xz, '0' stored.
        codec, body = block[4:5], block[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if codec not in decoders:
            raise ValueError(f"unknown lazy-load compression codec {codec!r}")
        payload = decoders[codec](body)
    else:
        raise ValueError(f"unsupported lazy-load compression type {compression}: expected 1, 2 or 3")
    if len(payload) != expected_length:
        raise ValueError(f"block decompressed to {len(payload)} bytes, header says {expected_length}")
    return payload


def read_lazyload_db(rdb_path: str | os.PathLike) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``Rdata.rdb`` + ``Rdata.rdx``).

    Args:
        rdb_path: Path to the ``.rdb`` file; the ``.rdx`` index must sit beside it.

    Returns:
        Variable name -> parsed object (see :func:`unserialize`), in the index's order.

    Raises:
        FileNotFoundError: The ``.rdb`` or ``.rdx`` file is missing.
        ValueError: The files are not a lazy-load database this reader understands.
    """
    rdb_path = Path(rdb_path)
    rdx_path = rdb_path.with_suffix(".rdx")
    index_bytes = rdx_path.read_bytes()
    # saveRDS writes the index gzip-compressed; accept a raw zlib stream or plain XDR too.
    if index_bytes[:2] == b"\x1f\x8b":
        index_bytes = gzip.decompress(index_bytes)
    elif index_bytes[:2] != b"X\n":
        index_bytes = zlib.decompress(index_bytes)
    index = unserialize(index_bytes)
    if not isinstance(index, RVector) or index.names is None or "variables" not in index.names:
        raise ValueError(f"{rdx_path} is not an R lazy-load index (no 'variables' entry)")
    fields = dict(zip(index.names, index, strict=True))
    variables = fields["variables"]
    if not isinstance(variables, RVector) or variables.names is None:
        raise ValueError(f"{rdx_path}: the 'variables' entry is not a named list")
    compressed = fields.get("compressed")
    compression = 1
    if compressed is not None and len(compressed) == 1:
        compression = int(compressed[0])
    if compression == 0:
        raise ValueError(f"{rdx_path}: uncompressed lazy-load databases are not supported")

    objects: dict[str, Any] = {}
    with open(rdb_path, "rb") as rdb:
        for name, (offset, length) in zip(variables.names, variables, strict=True):
            rdb.seek(int(offset))
            block = rdb.read(int(length))
            if len(block) != length:
                raise ValueError(f"{rdb_path} is truncated: block {name!r} needs {length} bytes")
            objects[str(name)] = unserialize(_decompress_block(block, compression))
    return objects


def _install_hint(cache_root: Path) -> str:
    target = cache_root / "janeaustenr"
    return (
        "Get it (about 1.6 MB, from Debian's package archive) with:\n"
        f"    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb {target}\n"
        "or run `bash scripts/setup.sh` from the kvpack repository; "
        f"or point ${_ENV_RDB} at an existing Rdata.rdb."
    )


def _cache_root() -> Path:
    return cache_root()


def _resolve_candidate(path: Path) -> Path | None:
    """``path`` itself if it is a file, else the Rdata.rdb inside an extracted package tree."""
    if path.is_file():
        return path
    if path.is_dir():
        for relative in (_RDB_RELPATH, Path("data/Rdata.rdb"), Path("Rdata.rdb")):
            if (path / relative).is_file():
                return path / relative
    return None


def find_austen_rdb(path: str | os.PathLike | None = None) -> Path:
    """Locate janeaustenr's ``Rdata.rdb``.

    Search order: ``path``; the ``KVPACK_AUSTEN_RDB`` environment variable;
    ``<cache>/janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`` where ``<cache>`` is
    ``$KVPACK_CACHE`` or ``~/.cache/kvpack``; then the system install
    ``/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb``. ``path`` and the environment variable
    may name the file itself or a directory holding it (e.g. the ``dpkg-deb -x`` target).

    Returns:
        The path of an existing ``Rdata.rdb`` file.

    Raises:
        FileNotFoundError: ``path`` or ``$KVPACK_AUSTEN_RDB`` is given but holds no such file (no
            silent fallback), or no candidate exists; the message gives the commands to fetch it.
    """
    cache_root = _cache_root()
    explicit = [("path", path), (f"${_ENV_RDB}", os.environ.get(_ENV_RDB) or None)]
    for label, value in explicit:
        if value is None:
            continue
        found = _resolve_candidate(Path(value).expanduser())
        if found is None:
            raise FileNotFoundError(f"janeaustenr data not found at {label}={value!s}.\n{_install_hint(cache_root)}")
        return found
    candidates = [cache_root / "janeaustenr" / _RDB_RELPATH, _SYSTEM_RDB]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = "\n".join(f"    {c}" for c in candidates)
    raise FileNotFoundError(f"janeaustenr's Rdata.rdb not found; searched:\n{searched}\n{_install_hint(cache_root)}")


@functools.lru_cache(maxsize=4)
def _load_books(rdb_path: Path) -> dict[str, str]:
    objects = read_lazyload_db(rdb_path)
    books: dict[str, str] = {}
    for name, lines in objects.items():
        if not isinstance(lines, RVector) or lines.sexptype != _STRSXP:
            raise ValueError(f"{rdb_path}: object {name!r} is not a character vector")
        books[name] = "\n".join("" if line is None else line for line in lines)
    logger.debug("read %d books (%d chars) from %s", len(books), sum(map(len, books.values())), rdb_path)
    return books


def austen_books(path: str | os.PathLike | None = None) -> dict[str, str]:
    """All six novels: book name (``"emma"``, ``"prideprejudice"``, ...) -> full text.

    Each text is the novel's lines joined with ``"\\n"`` (blank lines kept, ``NA`` lines as empty).
    Parsed once per file and cached in memory; the returned dict is a fresh copy.

    Args:
        path: Optional location of ``Rdata.rdb``; see :func:`find_austen_rdb` for the search order.

    Raises:
        FileNotFoundError: The data is not installed (the message says how to get it).
        ValueError: The file is not a database of character vectors.
    """
    return dict(_load_books(find_austen_rdb(path).resolve()))


def austen_text(book: str = "prideprejudice", path: str | os.PathLike | None = None) -> str:
    """The full text of one novel (lines joined with ``"\\n"``).

    Args:
        book: One of :data:`AUSTEN_BOOKS`; defaults to Pride and Prejudice.
        path: Optional location of ``Rdata.rdb``; see :func:`find_austen_rdb`.

    Raises:
        ValueError: ``book`` is not in the database; the message lists the available names.
        FileNotFoundError: The data is not installed (the message says how to get it).
    """
    books = _load_books(find_austen_rdb(path).resolve())
    if book not in books:
        raise ValueError(f"book must be one of {tuple(books)}, got {book!r}")
    return books[book]
