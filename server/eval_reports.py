"""Agents' evaluations of committed global versions, and the ones they withheld: checked, exported
as metrics and recorded (the version ranking and early stopping read them back)."""

from __future__ import annotations

import math
from collections.abc import Callable

from common.errors import FailedPrecondition, InvalidArgument, NotFound
from common.identity import SpiffeId
from common.metrics import peer_labels
from common.wire import check_detail
from server import metrics
from server.state import StateDB, WithheldEval
from server.version_ranking import AgentEval

MAX_SQLITE_INT = 2**63 - 1


class EvalReports:
    """Takes ``ReportEval``'s two kinds of report for the aggregator."""

    def __init__(self, db: StateDB, latest: Callable[[], int], joined: Callable[[str], bool]) -> None:
        """``latest()``: the newest committed version; ``joined(uri)``: whether an agent joined."""
        self._db, self._latest, self._joined = db, latest, joined

    def record(self, peer: SpiffeId, version: int, report: AgentEval) -> None:
        """Record an agent's evaluation of a committed global version: INVALID_ARGUMENT for a loss
        or noise deviation that is not a finite number >= 0 or no tokens, NOT_FOUND for a version
        not committed."""
        loss, tokens, stddev = report
        if not (math.isfinite(loss) and loss >= 0):
            raise InvalidArgument(f"eval_loss must be a finite number >= 0, not {loss}")
        if not 1 <= tokens <= MAX_SQLITE_INT:
            raise InvalidArgument(f"eval_tokens must be between 1 and {MAX_SQLITE_INT}, not {tokens}")
        if not (math.isfinite(stddev) and stddev >= 0):
            raise InvalidArgument(f"eval_loss_stddev must be a finite number >= 0, not {stddev}")
        self._check_committed(version)
        labels = peer_labels(peer)
        metrics.EVAL_LOSS.labels(**labels).set(loss)
        metrics.EVAL_LOSS_STDDEV.labels(**labels).set(stddev)
        metrics.EVAL_VERSION.labels(**labels).set(version)
        metrics.eval_withheld(labels, None)
        self._db.eval_reported(peer.uri, version, report)

    def withheld(self, peer: SpiffeId, withheld: WithheldEval, report: AgentEval) -> None:
        """Record that an agent withheld its eval loss of a committed version, and why:
        INVALID_ARGUMENT for words over MAX_DECLINE_DETAIL bytes or a report that also carries a
        loss, NOT_FOUND for a version not committed, FAILED_PRECONDITION before a Join."""
        if any(report):
            raise InvalidArgument(
                "a withheld eval report carries no eval_loss, eval_tokens or eval_loss_stddev"
            )
        check_detail(withheld.words, "withheld reason")
        self._check_committed(withheld.version)
        if not self._joined(peer.uri):
            raise FailedPrecondition("join before reporting an evaluation")
        labels = peer_labels(peer)
        metrics.EVALS_WITHHELD.labels(**labels, reason=withheld.reason).inc()
        metrics.eval_withheld(labels, withheld.reason)
        self._db.eval_withheld(peer.uri, withheld)

    def _check_committed(self, version: int) -> None:
        """NOT_FOUND unless global ``version`` is committed (an evaluation must be of one)."""
        latest = self._latest()
        if version > latest:
            raise NotFound(f"no global version {version} (the latest is {latest})")
