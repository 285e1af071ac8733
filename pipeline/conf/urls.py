"""Database URLs: their spellings, their parts, another database or role on the same
server, and what of them may be shown (secrets replaced by ``***``)."""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.core.errors import ConfigError


def normalize_url(url: str) -> str:
    """Return a libpq URL (``postgresql://``) for any PostgreSQL URL spelling.

    Accepts ``postgres://``, ``postgresql://`` and SQLAlchemy's ``postgresql+driver://``.
    Non-PostgreSQL URLs (another warehouse engine) are returned unchanged.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("postgres", "postgresql"):
        return urlunsplit(("postgresql", *parts[1:]))
    if not scheme:
        raise ConfigError(
            f"database URL has no scheme (found {redact(url)!r}); expected e.g. "
            "postgresql://user:password@host:5432/dbname"
        )
    return url


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy spelling of a PostgreSQL URL (psycopg2 driver)."""
    parts = urlsplit(normalize_url(url))
    if parts.scheme == "postgresql":
        return urlunsplit(("postgresql+psycopg2", *parts[1:]))
    return url


def url_from_parts(
    host: str | None,
    port: int | None,
    login: str | None,
    password: str | None,
    database: str | None,
) -> str:
    """Build a libpq URL from connection fields; a host starting with ``/`` is a socket dir."""
    auth = ""
    if login:
        auth = quote(login, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    db = quote(database or "postgres", safe="")
    if host and host.startswith("/"):
        return f"postgresql://{auth}/{db}?host={quote(host, safe='/')}" + (
            f"&port={port}" if port else ""
        )
    netloc = f"{auth}{host or 'localhost'}" + (f":{port}" if port else "")
    return f"postgresql://{netloc}/{db}"


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(normalize_url(url))
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database, safe=""), parts.query, ""))


_SECRET_KEYS = ("password", "passfile", "sslpassword", "sslkey")


def secrets_of(url: str) -> list[str]:
    """Every secret a URL (or a libpq key=value string) carries, raw and percent-encoded."""
    from urllib.parse import parse_qsl, unquote

    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found += [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_KEYS and v]
    except ValueError:
        pass
    found += [
        m.group(2)
        for m in re.finditer(r"\b(password|passfile|sslpassword)\s*=\s*('[^']*'|[^\s&]+)", url)
    ]
    out = set()
    for secret in found:
        secret = secret.strip("'")
        if secret:
            out |= {secret, unquote(secret), quote(unquote(secret), safe="")}
    return sorted(out, key=len, reverse=True)


def scrub(text: str, *urls: str) -> str:
    """``text`` (an error message, say) with every secret of ``urls`` replaced by ``***``."""
    for url in urls:
        for secret in secrets_of(url):
            text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """A URL safe to show: passwords (in the user part, in ``?password=``, in a libpq
    ``password=`` pair) are replaced by ``***``."""
    try:
        urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    return scrub(url, url)


def url_parts(url: str) -> dict[str, str | int | None]:
    """Split a libpq URL into connection fields (socket directory as ``host``)."""
    from urllib.parse import parse_qs, unquote

    parts = urlsplit(normalize_url(url))
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0] or None
    port = parts.port or (int(query["port"][0]) if "port" in query else None)
    return {
        "host": host,
        "port": port,
        "login": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "database": unquote(parts.path.lstrip("/")) or None,
    }


def with_role(url: str, role: str) -> str:
    """The URL with ``SET ROLE role`` applied at connection start (libpq ``options``).

    The pipeline writes as the ``nightscore_writer`` role whatever login the URL names, so
    that everything it creates is owned by that role. A URL that already sets options is
    returned unchanged.
    """
    from urllib.parse import parse_qsl, urlencode

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "options" for k, _ in query):
        return url
    query.append(("options", f"-c role={role}"))
    return urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urlencode(query, quote_via=quote), "")
    )
