"""The product holds no use case: each lives in its own folder, and adding one touches nothing
else. The code of ``pipeline/``, ``dags/`` and ``sql/`` names no use case, served table,
probability column, entity key or warehouse table (comments and docstrings may, as examples).
The synthetic warehouse and the demo driver are the simulated world's room, not the product.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from pipeline.conf import contract, usecase

REPO = Path(__file__).resolve().parents[2]
SIMULATED = REPO / "pipeline" / "synthetic"
USE_CASE_FOLDERS = [REPO / "usecases", REPO / "tests" / "data" / "usecases"]


def product_files() -> list[Path]:
    files = [p for p in (REPO / "pipeline").rglob("*.py") if SIMULATED not in p.parents]
    files += list((REPO / "dags").glob("*.py"))
    files += list((REPO / "sql" / "schema").glob("*.sql"))
    files += list((REPO / "sql" / "usecase").glob("*.sql"))
    return sorted(files)


def code_only(path: Path) -> str:
    """The file without comments and docstrings."""
    text = path.read_text()
    if path.suffix == ".sql":
        return re.sub(r"--[^\n]*", "", text)
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.add(value.lineno)
    kept = [
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type != tokenize.COMMENT
        and not (tok.type == tokenize.STRING and tok.start[0] in docstrings)
    ]
    return " ".join(kept)


def distinctive_names(uc: usecase.UseCase) -> set[str]:
    names = {uc.name, uc.score_table, uc.probability_column, uc.entity_key}
    names |= set(contract.load_contract(uc.contract).tables)
    if uc.campaign is not None:
        c = uc.campaign.contacts
        names |= {uc.campaign.audience_table, c.table, c.key, c.first_name, c.email, c.opt_in}
    return names - {"first_name", "email"}  # the audience table's own column names


def all_use_cases(monkeypatch: pytest.MonkeyPatch) -> list[usecase.UseCase]:
    monkeypatch.setenv(usecase.ENV_USECASES, ":".join(str(p) for p in USE_CASE_FOLDERS))
    found = usecase.discover()
    assert all(f.error is None for f in found), [f.error for f in found]
    return [f.use_case for f in found if f.use_case is not None]


def test_the_use_cases_under_test_are_all_there(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {uc.name for uc in all_use_cases(monkeypatch)} >= {"churn", "late_payment", "accounts"}


def test_product_code_names_no_use_case_table_or_column(monkeypatch: pytest.MonkeyPatch) -> None:
    code = {path: code_only(path) for path in product_files()}
    found = []
    for uc in all_use_cases(monkeypatch):
        for name in sorted(distinctive_names(uc)):
            pattern = re.compile(rf"\b{re.escape(name)}\b")
            found += [
                f"{path.relative_to(REPO)} names {name!r} ({uc.name})"
                for path, text in code.items()
                if pattern.search(text)
            ]
    assert found == []


def test_every_file_of_a_use_case_is_in_its_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    for uc in all_use_cases(monkeypatch):
        for role, path in usecase.iter_files(uc):
            assert path.parent == uc.folder, f"{uc.name}: {role} {path} outside {uc.folder}"
