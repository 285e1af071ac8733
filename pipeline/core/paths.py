"""Where the checkout's folders are: its root, and the shared SQL beside ``pipeline/``."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SQL_DIR = REPO_ROOT / "sql"
