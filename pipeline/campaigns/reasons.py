"""Why an entity is in the audience: up to three reasons from the model itself.

A feature is a reason when the entity's own value raises its score: the model's probability
for the entity minus its probability with that one feature set to the population's typical
value (:func:`contributions`). The reasons are worded in the use case's own phrases
(``campaign.reasons``, Jinja templates with the filters ``plural`` and ``percent``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.campaigns.campaign import configured
from pipeline.conf.usecase import UseCase
from pipeline.core.errors import ConfigError


def _plural(n: float, one: str, many: str | None = None) -> str:
    return f"{n:.0f} {one if round(n) == 1 else (many or one + 's')}"


def _percent(x: float) -> str:
    return f"{x:.0%}"


def reason_templates(uc: UseCase) -> dict[str, Any]:
    """The campaign's phrase for each feature (Jinja, with the filters plural and percent).

    Raises:
        ConfigError: a phrase that is not a valid template, naming the feature.
    """
    import jinja2

    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    env.filters["plural"] = _plural
    env.filters["percent"] = _percent
    out = {}
    for feature, phrase in configured(uc).reasons.items():
        try:
            out[feature] = env.from_string(phrase)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(
                f"{uc.source}: key campaign.reasons.{feature}: expected a Jinja phrase, found "
                f"{phrase!r} ({exc.message})"
            ) from None
    return out


def reason_text(templates: dict[str, Any], feature: str, value: Any) -> str:
    """The phrase for ``feature`` at ``value`` (plain ``feature: value`` where none fits)."""
    template = templates.get(feature)
    if template is None or value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{feature.replace('_', ' ')}: {value}"
    return str(template.render(value=value)).strip()


def contributions(
    model: Any, rows: pa.Table, columns: list[str], baseline: dict[str, Any]
) -> np.ndarray:
    """Per row and feature: how much the feature raises this customer's score.

    The model's probability for the row minus its probability with that one feature set
    to the population's typical value (median, or the most common category). Positive
    means the customer's own value pushes the risk up. One batch predict per feature.
    """
    from pipeline.stages import train

    p = train.predict(model, rows, columns)
    out = np.zeros((rows.num_rows, len(columns)))
    for j, name in enumerate(columns):
        col = rows.column(name)
        typical = pa.array([baseline[name]] * rows.num_rows, type=col.type)
        swapped = rows.set_column(rows.schema.get_field_index(name), name, typical)
        out[:, j] = p - train.predict(model, swapped, columns)
    return out


def typical_values(table: pa.Table, columns: list[str]) -> dict[str, Any]:
    """The median of each numeric feature, the most common value of each categorical or
    boolean one."""
    typical: dict[str, Any] = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_boolean(col.type):
            counts = col.value_counts()
            typical[name] = counts.field("values")[
                int(np.argmax(counts.field("counts").to_numpy()))
            ].as_py()
        else:
            value = pc.approximate_median(col).as_py()
            typical[name] = round(value) if pa.types.is_integer(col.type) else value
    return typical


def top_reasons(
    contrib: np.ndarray,
    rows: pa.Table,
    columns: list[str],
    templates: dict[str, Any],
    most: int = 3,
) -> list[tuple[list[str], list[str]]]:
    """Up to ``most`` (feature, words) per row: the features raising its score the most.

    Only features with a phrase are reasons; with no phrases at all, every feature is.
    """
    usable = np.array([c in templates or not templates for c in columns])
    ranked = np.argsort(-np.where(usable, contrib, -np.inf), axis=1)[:, :most]
    values = {c: rows.column(c).to_pylist() for c in columns}
    out = []
    for i, order in enumerate(ranked):
        chosen = [j for j in order if contrib[i, j] > 0 and usable[j]] or [int(order[0])]
        names = [columns[j] for j in chosen]
        out.append((names, [reason_text(templates, c, values[c][i]) for c in names]))
    return out
