"""Tests for kvpack.data: the R deserializer on hand-built bytes, then the real janeaustenr file."""

import gzip
import struct
import zlib

import pytest

from kvpack.data import AUSTEN_BOOKS, austen_books, austen_text, find_austen_rdb
from kvpack.data.austen import RVector, read_lazyload_db, unserialize

# --- a tiny XDR writer, just enough to build test inputs ----------------------------------------

HEADER_V3 = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
NILVALUE = struct.pack(">i", 254)
UTF8_CHARSXP_FLAGS = 9 | (8 << 12)  # CHARSXP with the UTF8 "levels" bit
ASCII_CHARSXP_FLAGS = 9 | (64 << 12)


def charsxp(text):
    if text is None:  # NA_STRING
        return struct.pack(">ii", 9, -1)
    raw = text.encode("utf-8")
    flags = ASCII_CHARSXP_FLAGS if text.isascii() else UTF8_CHARSXP_FLAGS
    return struct.pack(">ii", flags, len(raw)) + raw


def strsxp(values, attributes=b""):
    flags = 16 | (1 << 9 if attributes else 0)
    return struct.pack(">ii", flags, len(values)) + b"".join(map(charsxp, values)) + attributes


def intsxp(values):
    return struct.pack(f">ii{len(values)}i", 13, len(values), *values)


def names_attribute(names):
    # pairlist cell (LISTSXP with tag) -> tag SYMSXP "names" -> value -> CDR NILVALUE
    return struct.pack(">i", 2 | 1 << 10) + struct.pack(">i", 1) + charsxp("names") + strsxp(names) + NILVALUE


def vecsxp(items, names):
    flags = 19 | 1 << 9
    return struct.pack(">ii", flags, len(items)) + b"".join(items) + names_attribute(names)


# --- deserializer unit tests (no package needed) --------------------------------------------------


def test_unserialize_character_vector_with_na():
    data = HEADER_V3 + strsxp(["It is a truth", None])
    assert list(unserialize(data)) == ["It is a truth", None]


def test_unserialize_utf8_and_version2_header():
    data = b"X\n" + struct.pack(">iii", 2, 0x030400, 0x020300) + strsxp(["caf\u00e9", ""])
    assert list(unserialize(data)) == ["caf\u00e9", ""]


def test_unserialize_named_list_with_integer_na():
    data = HEADER_V3 + vecsxp([intsxp([1, -(2**31)]), strsxp(["x"])], ["offsets", "text"])
    value = unserialize(data)
    assert isinstance(value, RVector) and value.names == ["offsets", "text"]
    assert list(value[0]) == [1, None] and list(value[1]) == ["x"]


def test_unserialize_rejects_bad_input():
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n" + HEADER_V3[2:])
    with pytest.raises(ValueError, match="truncated"):
        unserialize(HEADER_V3 + strsxp(["abc"])[:-1])
    with pytest.raises(ValueError, match="SEXPTYPE 3"):  # a closure
        unserialize(HEADER_V3 + struct.pack(">i", 3))


def test_read_lazyload_db_on_synthetic_files(tmp_path):
    blocks, offsets = b"", []
    for lines in (["A", "B"], ["first line", None, "third"]):
        payload = HEADER_V3 + strsxp(lines)
        block = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets.append([len(blocks), len(block)])
        blocks += block
    (tmp_path / "Rdata.rdb").write_bytes(blocks)
    variables = vecsxp([intsxp(o) for o in offsets], ["one", "two"])
    index = vecsxp(
        [variables, vecsxp([], []), struct.pack(">iii", 10, 1, 1)], ["variables", "references", "compressed"]
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(HEADER_V3 + index))

    objects = read_lazyload_db(tmp_path / "Rdata.rdb")
    assert {k: list(v) for k, v in objects.items()} == {"one": ["A", "B"], "two": ["first line", None, "third"]}
    books = austen_books(tmp_path)  # a directory holding Rdata.rdb is accepted too
    assert books == {"one": "A\nB", "two": "first line\n\nthird"}
    with pytest.raises(ValueError, match=r"book must be one of \('one', 'two'\), got 'emma'"):
        austen_text("emma", path=tmp_path)


def test_find_austen_rdb_missing_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.delenv("KVPACK_AUSTEN_RDB", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get download r-cran-janeaustenr"):
        find_austen_rdb(tmp_path / "nope.rdb")
    monkeypatch.setenv("KVPACK_AUSTEN_RDB", str(tmp_path / "nope.rdb"))
    with pytest.raises(FileNotFoundError, match="KVPACK_AUSTEN_RDB"):
        find_austen_rdb()


def test_find_austen_rdb_uses_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("KVPACK_AUSTEN_RDB", raising=False)
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path))
    rdb = tmp_path / "janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    rdb.parent.mkdir(parents=True)
    rdb.write_bytes(b"")
    assert find_austen_rdb() == rdb


# --- the real janeaustenr data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_books():
    try:
        find_austen_rdb()
    except FileNotFoundError as err:
        pytest.skip(f"janeaustenr not installed (run scripts/setup.sh): {err}")
    return austen_books()


def test_real_file_has_six_books(real_books):
    assert sorted(real_books) == sorted(AUSTEN_BOOKS)


def test_pride_and_prejudice_opening(real_books):
    text = austen_text("prideprejudice")
    assert text == real_books["prideprejudice"]
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert "It is a truth universally acknowledged, that a single man in possession" in text[:500]


def test_total_size_is_plausible(real_books):
    total = sum(len(text) for text in real_books.values())
    assert total > 3_000_000
    assert all(len(text) > 300_000 for text in real_books.values())


def test_unknown_book_lists_available(real_books):
    with pytest.raises(ValueError, match="prideprejudice"):
        austen_text("ulysses")
