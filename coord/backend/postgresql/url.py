"""PostgreSQL locations: ``postgresql://user@host:port/dbname?schema=NAME``.

Standard library only (telling a URL from a path, and redaction, are ``coord.locations``).
libpq rejects parameters it does not know, so coord's own (``schema``) are taken out here before
the URL reaches the driver. A password is never shown: ``redacted`` replaces it (and any
``password=`` parameter) with ``***`` for messages, events, ``coord path`` and logs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from ...errors import StorageError
from ...locations import SCHEMES, join, redact

#: coord's own URL parameters: taken out before libpq sees the URL.
OWN_PARAMS = ("schema",)
DEFAULT_SCHEMA = "coord"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class PgLocation:
    """A parsed PostgreSQL location."""

    url: str  # as given, secret included: what children get in COORD_DB
    dsn: str  # for the driver: coord's own parameters removed
    schema: str  # one schema per deployment
    redacted: str  # for people: no secret

    def key(self) -> str:
        """Names the deployment on this host (side directories): server, database, user,
        schema — never the secret."""
        parts = urlsplit(self.dsn)
        ident = f"{parts.hostname}|{parts.port}|{parts.path}|{parts.username}|{self.schema}|" \
                f"{dict(parse_qsl(parts.query)).get('host', '')}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


def parse(url: str) -> PgLocation:
    """Split a PostgreSQL URL into the driver's DSN and coord's own parameters;
    ``StorageError`` (one line, no secret: exit 1, as for a store that cannot be opened)
    when it is malformed."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise StorageError(shown, f"malformed PostgreSQL URL: {e}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise StorageError(shown, "not a PostgreSQL URL")
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in OWN_PARAMS}
    rest = [(k, v) for k, v in query if k not in OWN_PARAMS]
    schema = unquote(own.get("schema", DEFAULT_SCHEMA)) or DEFAULT_SCHEMA
    if not _SCHEMA_NAME.fullmatch(schema):
        raise StorageError(shown, (
            f"schema {schema!r}: use lower-case letters, digits and _ (at most 63, "
            "not starting with a digit)"))
    dsn = join(parts.scheme, parts.netloc, parts.path,
                urlencode(rest, quote_via=quote, safe="/:@,"))
    return PgLocation(url=url, dsn=dsn, schema=schema, redacted=shown)
