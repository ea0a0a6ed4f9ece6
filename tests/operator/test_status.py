"""The `Ready` condition and the status patch: Kubernetes conventions, no Redis needed."""

from __future__ import annotations

from datetime import timedelta

from services.operator.status import Outcome, Reason, status_patch

from .conftest import NOW

APPLIED = Outcome(Reason.APPLIED, "in force", effective={"tier": "pro"})
CONFLICT = Outcome(Reason.CONFLICT, "owned by someone else")
LATER = NOW + timedelta(minutes=5)


def test_ready_condition_carries_reason_message_and_generation() -> None:
    patch = status_patch(APPLIED, generation=3, previous=None, now=NOW)

    assert patch == {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Applied",
                "message": "in force",
                "lastTransitionTime": "2025-03-14T12:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "effective": {"tier": "pro"},
    }


def test_last_transition_time_moves_only_when_the_status_changes() -> None:
    first = status_patch(APPLIED, generation=1, previous=None, now=NOW)
    same = status_patch(APPLIED, generation=2, previous=first, now=LATER)
    flipped = status_patch(CONFLICT, generation=2, previous=same, now=LATER)

    assert same["conditions"][0]["lastTransitionTime"] == "2025-03-14T12:00:00Z"
    assert flipped["conditions"][0]["lastTransitionTime"] == "2025-03-14T12:05:00Z"
    assert flipped["conditions"][0]["status"] == "False"


def test_conditions_of_other_types_are_kept() -> None:
    previous = {"conditions": [{"type": "Audited", "status": "True"}]}

    patch = status_patch(APPLIED, generation=1, previous=previous, now=NOW)

    assert [c["type"] for c in patch["conditions"]] == ["Ready", "Audited"]


def test_a_contender_drops_the_effective_limits_and_other_errors_leave_them() -> None:
    assert status_patch(CONFLICT, generation=1, previous=None, now=NOW)["effective"] is None
    for reason in (Reason.INVALID_SPEC, Reason.REDIS_UNAVAILABLE):
        patch = status_patch(Outcome(reason, "x"), generation=1, previous=None, now=NOW)
        assert "effective" not in patch


def test_usage_is_written_only_when_read() -> None:
    with_usage = Outcome(Reason.APPLIED, "ok", usage={"tokensToday": 5})

    assert "usage" not in status_patch(APPLIED, generation=1, previous=None, now=NOW)
    assert status_patch(with_usage, generation=1, previous=None, now=NOW)["usage"] == {
        "tokensToday": 5
    }
