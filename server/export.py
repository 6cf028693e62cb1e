"""``cloudfed-aggregator export``: a committed global version out as a peft adapter directory.

The version is chosen by number, as the latest, or as the best by the agents'
evaluations; its checkpoint is checked against its manifest's sha256 before
anything is written. The directory itself is written by ``agent.export``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from agent.export import ExportError, write_export
from agent.trainer import LoraSpec
from common.chunks import sha256_file
from common.config import AggregatorConfig
from common.errors import NotFound
from server.checkpoints import CheckpointStore
from server.state import StateDB
from server.version_ranking import AgentEval, Evals, best, loss_stddev, weighted_loss


@dataclass(frozen=True)
class Choice:
    """The version to export and why it was chosen."""

    version: int
    reason: str


def choose_version(
    committed: list[int], evals: Mapping[int, Evals], which: str, pruned: Sequence[int] = ()
) -> Choice:
    """``latest``, ``best`` or a version number. ``best`` is ``version_ranking.best``: the lowest
    token-weighted eval loss among the versions ``comparable`` over the same agents (so that a
    version only the agents with the easiest text evaluated cannot win), averaged over
    neighbouring versions when the losses are noised."""
    if not committed:
        raise ExportError("no global version is committed yet")
    if which == "latest":
        return Choice(committed[-1], "the latest committed version")
    if which == "best":
        chosen = best(committed, evals)
        if chosen is None:
            raise ExportError("no committed version has evaluations yet; pass --version latest or a number")
        return Choice(*chosen)
    try:
        version = int(which)
    except ValueError:
        raise ExportError(f"--version must be latest, best or a version number, not {which!r}") from None
    if version in pruned:
        raise ExportError(
            f"global version {version} was pruned by the checkpoint retention ([checkpoints]); "
            f"versions on disk: {_span(committed)}"
        )
    if version not in committed:
        raise ExportError(f"no global version {version} (on disk: {_span(committed)})")
    return Choice(version, "asked for by number")


def export(
    config: AggregatorConfig, which: str, out: Path, merge: bool, base: str | None, force: bool
) -> Choice:
    """Export a committed version of this aggregator's state to ``out``; return what was chosen."""
    store = CheckpointStore(config.state_dir / "checkpoints")
    db_path = config.state_dir / "cloudfed.db"
    evals: dict[int, dict[str, AgentEval]] = {}
    if db_path.exists():
        db = StateDB(db_path)
        try:
            evals = db.version_evals()
        finally:
            db.close()
    choice = choose_version(store.versions(), evals, which, store.pruned())
    try:
        manifest = store.manifest(choice.version)
    except NotFound as exc:
        raise ExportError(str(exc)) from None
    path = store.path(choice.version)
    digest = sha256_file(path).hexdigest()
    if digest != manifest.sha256:
        raise ExportError(
            f"checkpoint {path} does not match its manifest (sha256 {digest[:16]}..., manifest "
            f"{manifest.sha256[:16]}...): it is damaged; restore it from a backup or export another version"
        )
    f = config.federation
    base_model = base or f.model_id
    if not base_model:
        raise ExportError("the base model is unknown: set federation.model_id or pass --base")
    mine = evals.get(choice.version, {})
    provenance = {
        "federation_id": f.federation_id,
        "version": choice.version,
        "parent": manifest.parent,
        "chosen": choice.reason,
        "checkpoint_sha256": manifest.sha256,
        "layout_digest": manifest.layout_digest,
        "participants": manifest.participants,
        "evals": {
            agent: {"eval_loss": e.loss, "tokens": e.tokens, "eval_loss_stddev": e.stddev}
            for agent, e in mine.items()
        },
        "eval_loss": weighted_loss(mine) if mine else None,
        "eval_loss_stddev": loss_stddev(mine) if mine else None,
    }
    lora = LoraSpec(f.lora_rank, f.lora_alpha, tuple(f.target_modules), f.lora_dropout)
    write_export(out, load_file(path), lora, base_model, provenance, merge=merge, force=force)
    return choice


def _span(versions: list[int]) -> str:
    """``0, 5, 8..10``: the versions as runs."""
    runs: list[list[int]] = []
    for v in versions:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)
