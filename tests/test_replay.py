"""Old histories must keep replaying: every committed history under tests/histories/ replays cleanly.

Record new ones with `OUTBOUND_RECORD_HISTORIES=1 make test` after a change that adds a branch, and keep
the old files: they are what running workflows look like.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from delivery.converter import data_converter
from delivery.history import trace_from_history
from workflows.reply_delivery import ReplyDeliveryWorkflow

HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))


def test_histories_are_committed() -> None:
    assert len(HISTORIES) >= 5, "tests/histories/ should hold the recorded histories of the decision-flow tests"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_committed_history_replays_with_current_code(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[ReplyDeliveryWorkflow], data_converter=data_converter())
    await replayer.replay_workflow(history)
    trace = await trace_from_history(history, data_converter())
    assert trace.status in ("delivered", "failed", "cancelled", "awaiting_action", "delivering")
