"""What a ``--db``/``COORD_DB`` value names: a database file (SQLite, on this host) or a
PostgreSQL server (``postgresql://user@host:port/dbname?schema=NAME``), and how such a value
is shown to people: never with its password. Standard library only, so that telling a URL
from a path costs SQLite users nothing; the PostgreSQL engine parses the rest
(``coord.backend.postgresql.url``)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["SCHEMES", "is_url", "redact", "redact_words"]

SCHEMES = ("postgresql", "postgres")


def is_url(location: str) -> bool:
    """Whether ``location`` (a ``--db``/``COORD_DB`` value) names a PostgreSQL server."""
    head, sep, _ = location.partition("://")
    return bool(sep) and head.lower() in SCHEMES


def join(scheme: str, netloc: str, path: str, query: str) -> str:
    # urlunsplit drops the "//" of an empty host (postgresql:///db?host=/socket/dir).
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostport}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, "***" if k.lower() == "password" else v) for k, v in query]
    return join(parts.scheme, netloc, parts.path, urlencode(query, safe="/:@,*"))


_URL_IN_WORD = re.compile(r"(?i)\b(?:postgresql|postgres)://\S*")


def redact_words(words: list[str]) -> list[str]:
    """A command line with the password of every PostgreSQL URL in it (``--db=URL`` too)
    replaced by ``***``: what coord records and shows of a command line."""
    return [_URL_IN_WORD.sub(lambda m: redact(m.group(0)), w) if "://" in w else w
            for w in words]
