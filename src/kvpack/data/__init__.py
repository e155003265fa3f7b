"""Text corpora for evaluation, read from local files only (nothing is downloaded at run time)."""

from kvpack.data.austen import AUSTEN_BOOKS, austen_books, austen_text, find_austen_rdb

__all__ = ["AUSTEN_BOOKS", "austen_books", "austen_text", "find_austen_rdb"]
