"""The reports' pages: one style, a plain page in it (titles escaped here), their
numbers, and writing a page atomically."""

from __future__ import annotations

import html
import os
from pathlib import Path

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em;
       color: #222; max-width: 1200px; }
h1 { margin-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
.meta code { background: #f3f3f3; padding: 0 0.3em; }
.decision { display: inline-block; padding: 0.4em 1.2em; border-radius: 0.3em; color: #fff;
            font-size: 1.6em; font-weight: bold; letter-spacing: 0.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-family: Menlo, Consolas, monospace; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots figure { margin: 0; }
.plots img { max-width: 100%; border: 1px solid #ddd; }
.plots figcaption { color: #555; font-size: 0.9em; }
.note { color: #777; font-size: 0.9em; }
.banner { padding: 0.8em 1.2em; border-radius: 0.3em; margin: 0.8em 0 1.2em 0; color: #fff;
          font-size: 1.1em; }
.banner-failed { background: #b3261e; }
.banner-ok { background: #1e7b34; }
.banner-info { background: #1f5fa8; }
.banner-warn { background: #b26a00; }
.banner code { background: rgba(255,255,255,0.2); color: #fff; }
.badge { color: #fff; padding: 0.1em 0.5em; border-radius: 0.3em; font-size: 0.9em; }
.links a { margin-right: 1.2em; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.header dt { font-weight: bold; }
dl.header dd { margin: 0; }
"""


def simple_page(title: str, body: str) -> str:
    """A self-contained page in the reports' style: ``title`` (escaped here) as its title
    and heading, then ``body`` (HTML, escaped by the caller)."""
    esc = html.escape(title)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc}</title><style>{STYLE}</style></head><body><h1>{esc}</h1>{body}"
        "</body></html>"
    )


def percent(value: object) -> str:
    """A fraction as a percentage; a dash where there is none (an empty group)."""
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "&mdash;"


def write_atomically(path: Path, text: str) -> Path:
    """Write the page ``text`` to ``path``, readable by its owner only; readers never see a
    partial page (a temporary file in the same folder, then ``os.replace``). Missing parent
    folders are created. Returns ``path``."""
    from pipeline.core import files

    path.parent.mkdir(parents=True, exist_ok=True)
    files.sweep(path.parent)
    tmp_name = files.temporary(path)
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o600)  # its owner only, like everything under the home
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
