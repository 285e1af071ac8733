from __future__ import annotations

from datetime import date

import pytest

from pipeline.conf import usecase
from pipeline.core.errors import ConfigError
from pipeline.stages import features
from pipeline.store import db


def test_named_parameters_become_positional_and_casts_survive() -> None:
    text, values = db.positional(
        "SELECT CAST(:as_of AS date) - 1, x::int FROM t WHERE d < :as_of AND e < :label_end",
        {"as_of": date(2025, 1, 1), "label_end": date(2025, 1, 31)},
    )
    assert text == "SELECT CAST($1 AS date) - 1, x::int FROM t WHERE d < $1 AND e < $2"
    assert values == (date(2025, 1, 1), date(2025, 1, 31))


def test_missing_parameter_is_named() -> None:
    with pytest.raises(ConfigError, match=":label_end"):
        db.positional("SELECT :as_of, :label_end", {"as_of": 1})


@pytest.mark.parametrize("name", usecase.names())
def test_every_use_case_sql_file_only_uses_known_parameters(name: str) -> None:
    uc = usecase.load(name)
    for role in ("features", "labels", "source_counts"):
        if getattr(uc.sql, role) is not None:
            db.positional(
                features.query(uc, role),
                {"as_of": date(2025, 1, 1), "label_end": date(2025, 1, 31)},
            )
