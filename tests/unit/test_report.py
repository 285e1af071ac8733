from __future__ import annotations

import base64
import re
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from pipeline.reports.evaluation_report import write_evaluation_report
from pipeline.reports.run_report import (
    NightContext,
    failed_stage,
    night_banner,
    write_run_report,
)
from pipeline.stages import evaluate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_PATTERN = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _holdout(seed: int = 7, n: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.12).astype(np.int64)
    p_challenger = np.clip(0.08 + 0.25 * y + rng.normal(0.0, 0.1, n), 0.001, 0.999)
    p_champion = np.clip(0.09 + 0.15 * y + rng.normal(0.0, 0.1, n), 0.001, 0.999)
    return y, p_challenger, p_champion


def _intervals() -> dict[str, dict[str, float]]:
    return {
        "roc_auc_diff": {"estimate": 0.041234, "low": 0.02, "high": 0.061, "confidence": 0.9999},
        "log_loss_gain": {"estimate": 0.00412, "low": 0.0011, "high": 0.0071, "confidence": 0.996},
    }


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in IMAGE_PATTERN.findall(text)]


def _evaluation(
    challenger: str,
    champion: str | None,
    metrics: dict,
    decision: str,
    reasons: list[str],
    evidence: dict | None = None,
    use_case: str = "churn",
    holdout: date = date(2024, 11, 20),
) -> evaluate.Evaluation:
    return evaluate.Evaluation(
        use_case=use_case,
        challenger=challenger,
        champion=champion,
        holdouts=[{"as_of": holdout.isoformat(), "rows": 3000, "positives": 360, "compared": True}],
        verdict=evaluate.Verdict(metrics, evidence or {}, []),
        decision=decision,
        reasons=reasons,
    )


def test_report_with_champion(tmp_path: Path) -> None:
    y, p_ch, p_cp = _holdout()
    reasons = ["roc_auc improved by 0.04", "calibration within tolerance <script>alert(1)</script>"]
    target = tmp_path / "nested" / "folder" / "report.html"
    metrics = {
        "challenger": evaluate.classification_metrics(y, p_ch),
        "champion": evaluate.classification_metrics(y, p_cp),
    }
    evaluation = _evaluation(
        "churn-2024-11-20-abc", "churn-2024-10-01-xyz", metrics, "promote", reasons, _intervals()
    )
    result = write_evaluation_report(target, evaluation, y=y, p_challenger=p_ch, p_champion=p_cp)

    assert result == target
    assert target.is_file()
    assert target.stat().st_size < 1_000_000
    text = target.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 3
    images = _images(text)
    assert len(images) == 3
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    assert "promote" in text
    assert "roc_auc improved by 0.04" in text
    assert "calibration within tolerance &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>" not in text
    assert "churn-2024-11-20-abc" in text
    assert "churn-2024-10-01-xyz" in text
    assert "2024-11-20" in text and "360 positives" in text
    # metric table rows; the evidence to 5 decimals with its probability
    assert "roc_auc" in text and "lift_top_decile" in text
    assert "+0.04123" in text and "[+0.02000, +0.06100]" in text and "99.6%" in text
    # no temporary file left behind
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_report_without_champion(tmp_path: Path) -> None:
    y, p_ch, _ = _holdout(seed=3)
    target = tmp_path / "report.html"
    evaluation = _evaluation(
        "v<1>",
        None,
        {"challenger": evaluate.classification_metrics(y, p_ch), "champion": None},
        "awaiting_approval",
        ["no champion yet: first model needs approval"],
        use_case="upsell & cross-sell",
    )
    write_evaluation_report(target, evaluation, y=y, p_challenger=p_ch, p_champion=None)

    text = target.read_text(encoding="utf-8")
    assert target.stat().st_size < 1_000_000
    images = _images(text)
    assert len(images) == 3
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    assert "awaiting_approval" in text
    assert "no champion yet: first model needs approval" in text
    assert "v&lt;1&gt;" in text and "v<1>" not in text
    assert "upsell &amp; cross-sell" in text


def test_report_replaces_existing_file(tmp_path: Path) -> None:
    y, p_ch, p_cp = _holdout(seed=5, n=500)
    target = tmp_path / "report.html"
    target.write_text("old", encoding="utf-8")
    evaluation = _evaluation(
        "v2",
        "v1",
        {"challenger": {"roc_auc": 0.8}, "champion": {"roc_auc": 0.75}},
        "reject",
        ["worse lift"],
        _intervals(),
    )
    write_evaluation_report(target, evaluation, y=y, p_challenger=p_ch, p_champion=p_cp)

    text = target.read_text(encoding="utf-8")
    assert "reject" in text and "worse lift" in text and "+0.0500" in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_report_single_class_holdout_still_renders(tmp_path: Path) -> None:
    y = np.zeros(50, dtype=np.int64)
    p = np.linspace(0.01, 0.5, 50)
    evaluation = _evaluation(
        "v2", None, {"challenger": {"roc_auc": float("nan")}, "champion": None}, "shadow", []
    )
    target = write_evaluation_report(
        tmp_path / "r.html", evaluation, y=y, p_challenger=p, p_champion=None
    )
    text = target.read_text(encoding="utf-8")
    assert len(_images(text)) == 3
    assert "n/a" in text


def test_report_rejects_mismatched_lengths(tmp_path: Path) -> None:
    evaluation = _evaluation("v2", None, {"challenger": {}, "champion": None}, "reject", [])
    with pytest.raises(ValueError, match="one value per holdout row"):
        write_evaluation_report(
            tmp_path / "r.html",
            evaluation,
            y=np.array([0, 1, 0]),
            p_challenger=np.array([0.1, 0.9]),
            p_champion=None,
        )
    assert not (tmp_path / "r.html").exists()


def _run_report(
    path: Path, uplift: list[dict[str, object]], context: NightContext | None = None
) -> str:
    write_run_report(
        path,
        use_case="churn",
        score_date=date(2024, 11, 20),
        model_version="v1",
        score_hist=None,
        previous_hist=None,
        drift=[],
        checks=[],
        realized=[],
        decile_rates=None,
        uplift=uplift,
        context=context,
    )
    return path.read_text(encoding="utf-8")


def test_run_report_states_the_experiment_its_power_and_the_policy_in_force(
    tmp_path: Path,
) -> None:
    from pipeline.campaigns import experiment

    rows = [
        {"score_date": date(2024, 9, 2) + timedelta(weeks=w), "contacted": 1000,
         "contacted_positives": 90, "control": 250, "control_positives": 30}
        for w in range(6)
    ]  # fmt: skip
    pooled = experiment.pooled(rows)
    plan = experiment.plan(1000, 0.2, 0.12, 0.03, 1, 8)
    state = {
        "pooled": experiment.pooled_text(pooled),
        "plan": experiment.plan_text(plan),
        "policy": "ranked by expected uplift: policy churn-uplift-1 <x>",
    }
    text = _run_report(tmp_path / "night.html", [], NightContext(run=None, campaign=state))
    assert "Campaign experiment" in text
    assert "+3.0 pp (95% CI" in text and "over 6 weekly cohorts" in text
    assert "conclusive" in text and "smallest detectable so far" in text
    assert f"needs {plan['weeks_needed']} weeks" in text
    assert "churn-uplift-1 &lt;x&gt;" in text
    assert "Campaign experiment" not in _run_report(tmp_path / "other.html", [])


def test_run_report_shows_campaign_uplift_in_percentage_points(tmp_path: Path) -> None:
    text = _run_report(
        tmp_path / "night.html",
        [
            {
                "campaign": "churn_retention_20241001 <b>",
                "score_date": date(2024, 10, 1),
                "contacted": 300,
                "contacted_positives": 15,
                "control": 200,
                "control_positives": 20,
                "contacted_rate": 0.05,
                "control_rate": 0.1,
                "uplift": 0.05,
                "ci_low": -0.00123,
                "ci_high": 0.10123,
            },
            {
                "campaign": "churn_retention_20240901",
                "score_date": date(2024, 9, 1),
                "contacted": 40,
                "contacted_positives": 2,
                "control": 0,
                "control_positives": 0,
                "contacted_rate": 0.05,
                "control_rate": None,
                "uplift": None,
                "ci_low": None,
                "ci_high": None,
            },
        ],
    )
    assert "Campaign uplift (once labels matured)" in text
    assert "churn_retention_20241001 &lt;b&gt;" in text and "<b>" not in text
    assert "2024-10-01" in text and "300 (15)" in text and "200 (20)" in text
    assert "5.0%" in text and "10.0%" in text
    assert "+5.0 [-0.1, +10.1]" in text
    # an empty control group: no rate, no uplift, no interval
    assert "0 (0)" in text and "&mdash; [&mdash;, &mdash;]" in text
    assert "no campaign has matured yet" not in text


def test_run_report_says_when_no_campaign_has_matured(tmp_path: Path) -> None:
    text = _run_report(tmp_path / "night.html", [])
    assert "Campaign uplift (once labels matured)" in text
    assert "no campaign has matured yet" in text


def _night(tmp_path: Path, context: NightContext) -> str:
    path = tmp_path / "night.html"
    write_run_report(
        path,
        use_case="churn",
        score_date=date(2024, 11, 21),
        model_version=None,
        score_hist=None,
        previous_hist=None,
        drift=[],
        checks=[],
        realized=[],
        decile_rates=None,
        context=context,
    )
    return path.read_text(encoding="utf-8")


FAILED_RUN = {
    "run_id": "scheduled__2024-11-21T00:00:00+00:00",
    "attempt": 2,
    "status": "failed",
    "error": "check_sources: table warehouse.usage_daily is 3 days stale",
    "stages": {
        "start_run": {"status": "ok", "seconds": 0.1},
        "check_sources": {"status": "failed", "seconds": 1.5, "error": "stale"},
    },
    "snapshot_sha256": None,
    "code_version": "abc123def456",
    "model_version": None,
    "rows_published": None,
}
SERVED = {
    "score_date": date(2024, 11, 20),
    "model_version": "churn-20241120-aa",
    "run_id": "r20",
    "rows": 4000,
}


def test_a_failed_night_says_where_it_failed_and_what_stays_served(tmp_path: Path) -> None:
    context = NightContext(run=FAILED_RUN, served=SERVED, previous_night=date(2024, 11, 20))
    assert failed_stage(FAILED_RUN) == "check_sources"
    kind, banner = night_banner(date(2024, 11, 21), context)
    assert kind == "failed"
    assert "failed at <code>check_sources</code>" in banner and "3 days stale" in banner
    assert "Nothing of this night was published" in banner
    assert "<strong>2024-11-20</strong>" in banner and "churn-20241120-aa" in banner
    text = _night(tmp_path, context)
    assert text.index("banner-failed") < text.index("Seconds per stage")
    assert "served model none" not in text
    assert 'href="2024-11-20">previous night: 2024-11-20' in text
    assert "dags/churn_nightly/runs/" not in text  # airflow_run not given
    assert "abc123def456" in text and "attempt 2" in text


def test_a_night_failing_after_the_swap_says_its_scores_stay_served(tmp_path: Path) -> None:
    run = FAILED_RUN | {
        "error": "write_report: disk full",
        "stages": {"publish_scores": {"status": "ok"}, "write_report": {"status": "failed"}},
    }
    published = {
        "score_date": date(2024, 11, 21),
        "model_version": "m",
        "run_id": run["run_id"],
        "rows": 4000,
    }
    kind, banner = night_banner(
        date(2024, 11, 21), NightContext(run=run, served=published, published=published)
    )
    assert kind == "failed" and "published before the failure (4,000 rows" in banner


def test_a_published_night_has_a_header_and_links(tmp_path: Path) -> None:
    run = FAILED_RUN | {
        "status": "published",
        "error": None,
        "model_version": "churn-20241121-bb",
        "rows_published": 4000,
        "snapshot_sha256": "f" * 64,
        "stages": {
            "decide_retrain": {"status": "ok", "retrain": True, "why": "no champion yet"},
            "score_partition_1": {"status": "ok", "seconds": 2.25},
            "build_features": {"status": "ok", "seconds": 3.5, "rows": 4000},
        },
    }
    published = {
        "score_date": date(2024, 11, 21),
        "model_version": "churn-20241121-bb",
        "run_id": run["run_id"],
        "rows": 4000,
    }
    context = NightContext(
        run=run,
        served=published,
        published=published,
        evaluation={
            "challenger": "churn-20241121-bb",
            "decision": "promote",
            "reasons": ["all 8 checks passed", "AUC +0.012 over the <champion>"],
        },
        airflow_run="dags/churn_nightly/runs/scheduled__x",
        segments=[
            {
                "segment": "country",
                "value": "PL",
                "rows": 10,
                "share": 0.1,
                "mean": 0.2,
                "top_decile_share": 0.3,
            }
        ],
        shadow=[
            {
                "shadow": "s",
                "champion": "c",
                "rows": 4000,
                "spearman": 0.9,
                "top_decile_overlap": 0.8,
                "audience_capacity": 1000,
                "audience_enter": 5,
                "audience_leave": 5,
            }
        ],
    )
    text = _night(tmp_path, context)
    assert "banner-ok" in text and "Published</strong> 4,000 rows" in text
    assert "yes: no champion yet" in text and "ffffffffffffffff" in text
    assert "promote<br>all 8 checks passed<br>AUC +0.012 over the &lt;champion&gt;" in text
    assert 'href="../../churn/evaluation/churn-20241121-bb"' in text
    assert 'href="../../../dags/churn_nightly/runs/scheduled__x"' in text
    assert text.index(">build_features<") < text.index(">score_partition_1<")
    assert "<td>PL</td>" in text and "0.900" in text
