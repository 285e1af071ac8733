from __future__ import annotations

from datetime import UTC, datetime

from pipeline.store.registry import Review


def test_an_answer_from_the_approval_form_becomes_a_sentence() -> None:
    review = Review.from_hitl(
        {
            "chosen_options": ["Reject"],
            "responded_by_user": {"id": "7", "name": "admin"},
            "responded_at": "2026-12-06T09:04:31+00:00",
        }
    )
    assert review == Review(False, "admin", datetime(2026, 12, 6, 9, 4, 31, tzinfo=UTC))
    assert review.decision == "rejected"
    assert review.text("churn-x", "kept as shadow") == (
        "Rejected by admin at 2026-12-06 09:04 UTC; churn-x kept as shadow"
    )


def test_a_timed_out_approval_says_nobody_answered() -> None:
    review = Review.from_hitl(
        {"chosen_options": ["Reject"], "responded_by_user": None, "responded_at": None}
    )
    assert not review.approved and review.by is None
    assert "by nobody (the approval timed out)" in review.text("churn-x", "kept as shadow")


def test_an_approval_in_another_zone_is_told_in_utc() -> None:
    review = Review.from_hitl(
        {
            "chosen_options": ["Approve"],
            "responded_by_user": {"id": "ana"},
            "responded_at": "2026-12-06T10:04:00+01:00",
        }
    )
    assert review.approved and review.by == "ana"
    assert review.text("v", "promoted").startswith("Approved by ana at 2026-12-06 09:04 UTC")
