"""Async client for the aggregator: join, watch, resumable download and upload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

import common
from common.backoff import backoff_delays
from common.chunks import MAX_CHUNK_BYTES, iter_file_chunks, sha256_file, validate_chunk_bytes
from common.codecs.registry import KNOWN as KNOWN_CODECS
from common.errors import DataLoss, FailedPrecondition, InvalidArgument
from common.grpc_client_metrics import client_metrics_interceptors
from common.grpc_options import DOWNLOAD_DEADLINE_S, UNARY_DEADLINE_S, channel_options, upload_deadline_s
from common.identity import IdentityError, SpiffeId
from common.metrics import TRANSFER_BYTES, peer_labels, rpc_types_of
from common.pki import spiffe_ids_of
from common.secagg_pb import EVAL_WITHHELD_REASONS, state_request
from common.tls import TlsFiles, channel_credentials
from common.wire import WIRE_REVISION, check_aggregator, clipped_detail
from protos.cloudfed.v1 import federation_pb2 as pb
from protos.cloudfed.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Status codes after which a transfer is resumed rather than given up."""


class IncompleteTransfer(Exception):
    """A stream ended cleanly before all bytes arrived; resume it."""


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed call is worth retrying."""
    if isinstance(exc, IncompleteTransfer):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE


class AggregatorClient:
    """One mTLS channel to the aggregator."""

    def __init__(
        self,
        target: str,
        tls: TlsFiles,
        server_name: str = "",
        chunk_bytes: int = MAX_CHUNK_BYTES,
        attempts: int = 8,
    ) -> None:
        self.chunk_bytes = validate_chunk_bytes(chunk_bytes, "chunk_bytes")
        self.labels = _own_labels(tls)  # shared with the metric interceptors; Join confirms it
        self.attempts = attempts
        service = pb.DESCRIPTOR.services_by_name["FederationService"]
        self.channel = grpc.aio.secure_channel(
            target,
            channel_credentials(tls),
            options=channel_options(server_name or None),
            interceptors=client_metrics_interceptors(rpc_types_of(service), self.labels),
        )
        self.stub = pb_grpc.FederationServiceStub(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close(None)

    async def __aenter__(self) -> AggregatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def join(
        self,
        num_examples: int,
        device: pb.DeviceInfo | None = None,
        codecs: tuple[str, ...] = KNOWN_CODECS,
        privacy: pb.PrivacyPolicy | None = None,
    ) -> pb.JoinResponse:
        """Announce this agent (and its privacy policy) and get the federation's settings.

        Raises FailedPrecondition when the two sides cannot work together (another wire
        revision, a codec this agent cannot encode): no retry fixes that.
        """
        request = pb.JoinRequest(
            software_version=common.__version__,
            supported_codecs=codecs,
            device=device,
            num_examples=num_examples,
            wire_revision=WIRE_REVISION,
            privacy=privacy,
        )
        # Fails fast (no wait_for_ready): a bad certificate must surface at once, not as a deadline.
        try:
            response: pb.JoinResponse = await self.stub.Join(request, timeout=UNARY_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(f"the aggregator refused to let us join: {exc.details()}") from exc
            raise
        check_aggregator(response.wire_revision)
        with contextlib.suppress(IdentityError):
            self.labels.update(peer_labels(SpiffeId.parse(response.agent_id)))  # shared with the interceptors
        server_limit = response.settings.chunk_limits.max_chunk_bytes
        if server_limit and server_limit < self.chunk_bytes:
            log.info("using the aggregator's chunk limit of %d bytes", server_limit)
            self.chunk_bytes = validate_chunk_bytes(server_limit, "aggregator's max_chunk_bytes")
        return response

    async def watch_rounds(self) -> AsyncIterator[pb.RoundEvent]:
        """Round events until the stream ends or fails."""
        call = self.stub.WatchRounds(pb.WatchRoundsRequest())
        async for response in call:
            yield response.event

    async def report_eval(self, version: int, loss: float, tokens: int, stddev: float = 0.0) -> None:
        """Report a local evaluation of a global version (``stddev``: its DP noise's, 0 if exact)."""
        await self.stub.ReportEval(
            pb.ReportEvalRequest(
                global_version=version, eval_loss=loss, eval_tokens=tokens, eval_loss_stddev=stddev
            ),
            timeout=UNARY_DEADLINE_S,
        )

    async def report_withheld(self, version: int, reason: str, words: str) -> None:
        """Tell the aggregator this agent withholds its eval loss of a global version, and why: a
        ``reason`` of ``EVAL_WITHHELD_REASONS``, in ``words``."""
        request = pb.ReportEvalRequest(
            global_version=version,
            withheld=clipped_detail(words),
            withheld_reason=EVAL_WITHHELD_REASONS[reason],
        )
        await self.stub.ReportEval(request, timeout=UNARY_DEADLINE_S)

    async def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> None:
        """Post this agent's signed round keys (``secagg_pb.advertise_request``)."""
        await self.stub.AdvertiseKeys(request, timeout=UNARY_DEADLINE_S)

    async def share_keys(self, request: pb.ShareKeysRequest) -> None:
        """Post the sealed shares for this agent's neighbours (``secagg_pb.share_request``)."""
        await self.stub.ShareKeys(request, timeout=UNARY_DEADLINE_S)

    async def secagg_state(self, round_id: int, phase: int, wait_s: float) -> pb.GetSecAggStateResponse:
        """Wait (up to ``wait_s``) for the round to reach ``phase``; what this agent needs in it."""
        response: pb.GetSecAggStateResponse = await self.stub.GetSecAggState(
            state_request(round_id, phase), timeout=wait_s
        )
        return response

    async def reveal_shares(self, request: pb.RevealSharesRequest) -> None:
        """Answer the unmask request (``secagg_pb.reveal_request``)."""
        await self.stub.RevealShares(request, timeout=UNARY_DEADLINE_S)

    async def decline_round(self, round_id: int, reason: int, detail: str) -> None:
        """Tell the aggregator this agent sits round ``round_id`` out (``reason``: a
        ``DeclineReason``), so that it stops waiting for us."""
        request = pb.DeclineRoundRequest(
            round_id=round_id, reason=pb.DeclineReason.ValueType(reason), detail=clipped_detail(detail)
        )
        await self.stub.DeclineRound(request, timeout=UNARY_DEADLINE_S)

    async def revocation_list(self) -> bytes | None:
        """The PEM CRLs the aggregator enforces, unverified; None if it enforces none (or is older
        than the call)."""
        try:
            response: pb.GetRevocationListResponse = await self.stub.GetRevocationList(
                pb.GetRevocationListRequest(), timeout=UNARY_DEADLINE_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                return None
            raise
        return response.crl_pem

    async def upload_status(self, upload_id: str) -> pb.GetUploadStatusResponse | None:
        """Where an upload stands, or None if the aggregator never saw it."""
        try:
            response: pb.GetUploadStatusResponse = await self.stub.GetUploadStatus(
                pb.GetUploadStatusRequest(upload_id=upload_id), timeout=UNARY_DEADLINE_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return response

    async def _upload_messages(
        self, path: Path, header: pb.UploadHeader, start: int
    ) -> AsyncIterator[pb.UploadUpdateRequest]:
        yield pb.UploadUpdateRequest(header=header)
        chunks = iter_file_chunks(path, self.chunk_bytes, start)
        sent = TRANSFER_BYTES.labels(direction="sent", kind="update", **self.labels)
        for offset, data in chunks:  # page-cache reads of 1 MiB: cheaper inline than via a thread
            yield pb.UploadUpdateRequest(chunk=pb.Chunk(offset=offset, data=data))
            sent.inc(len(data))  # handed to gRPC: re-sent bytes after a resume count again, as on the wire

    async def _probe_header(self, header: pb.UploadHeader) -> pb.UploadUpdateResponse:
        """Send the header alone: the server's verdict on it, with no chunk write to race."""

        async def only_header() -> AsyncIterator[pb.UploadUpdateRequest]:
            yield pb.UploadUpdateRequest(header=header)

        receipt: pb.UploadUpdateResponse = await self.stub.UploadUpdate(
            only_header(), timeout=UNARY_DEADLINE_S
        )
        return receipt

    async def upload(
        self, path: Path, header: pb.UploadHeader, *, new: bool = False
    ) -> pb.UploadUpdateResponse:
        """Upload a payload file, resuming from the committed offset after failures.

        ``header`` needs round_id, upload_id, codec, layout_sha256, base_version
        and weight; total_bytes is filled from the file, and sha256 too unless set.
        ``new``: the upload id was never sent, so the first attempt starts at byte 0
        without asking where the upload stands (a round trip less); later ones ask.
        """
        header = _complete_header(path, header)
        delays = backoff_delays()
        for attempt in range(1, self.attempts + 1):
            try:
                status = None if new and attempt == 1 else await self.upload_status(header.upload_id)
                start = status.committed_bytes if status else 0
                if status and status.digest_verified:
                    return pb.UploadUpdateResponse(
                        upload_id=header.upload_id, committed_bytes=start, digest_verified=True
                    )
                try:
                    receipt: pb.UploadUpdateResponse = await self.stub.UploadUpdate(
                        self._upload_messages(path, header, start),
                        timeout=upload_deadline_s(header.total_bytes - start),
                    )
                except grpc.aio.AioRpcError as exc:
                    if not _status_lost_to_late_write(exc):
                        raise
                    receipt = await self._probe_header(header)  # raises the server's real status
                if receipt.digest_verified:
                    return receipt
                log.warning(
                    "upload %s stopped at %d of %d bytes; resuming",
                    header.upload_id,
                    receipt.committed_bytes,
                    header.total_bytes,
                )
            except grpc.aio.AioRpcError as exc:
                if not is_retryable(exc) or attempt == self.attempts:
                    raise
                log.warning(
                    "upload %s attempt %d failed (%s); resuming", header.upload_id, attempt, exc.code().name
                )
            await asyncio.sleep(next(delays))
        raise InvalidArgument(f"upload {header.upload_id} did not complete in {self.attempts} attempts")

    async def download_model(self, dest: Path, version: int = 0) -> pb.ModelHeader:
        """Download a global version (0: latest) to ``dest``, resuming after broken streams."""
        if version == 0:
            dest.with_name(dest.name + ".part").unlink(missing_ok=True)  # a leftover of unknown version
        pinned = [version]

        def check(header: pb.ModelHeader) -> None:
            if pinned[0] and header.version != pinned[0]:
                raise InvalidArgument(f"asked for version {pinned[0]}, got {header.version}")
            pinned[0] = header.version  # a resumed download continues the same version

        def call(start: int) -> Any:
            request = pb.DownloadModelRequest(version=pinned[0], offset=start)
            return self.stub.DownloadModel(request, timeout=DOWNLOAD_DEADLINE_S)

        header: pb.ModelHeader = await self._download_file(dest, call, check, "model")
        return header

    async def download_codec_state(self, sha256_hex: str, dest: Path) -> pb.CodecStateHeader:
        """Download the codec state named by its sha256 to ``dest``, resuming after broken streams."""
        digest = bytes.fromhex(sha256_hex)

        def check(header: pb.CodecStateHeader) -> None:
            if header.sha256 != digest:
                raise InvalidArgument(f"asked for codec state {sha256_hex}, got {header.sha256.hex()}")

        def call(start: int) -> Any:
            request = pb.DownloadCodecStateRequest(sha256=digest, offset=start)
            return self.stub.DownloadCodecState(request, timeout=DOWNLOAD_DEADLINE_S)

        header: pb.CodecStateHeader = await self._download_file(dest, call, check, "control")
        return header

    async def _download_file(
        self, dest: Path, call: Callable[[int], Any], check: Callable[[Any], None], kind: str
    ) -> Any:
        """A header-then-chunks download into ``dest`` (via ``dest.part``), resumed from the bytes
        already there after retryable failures; the whole file's sha256 must match the header's."""
        part = dest.with_name(dest.name + ".part")
        delays = backoff_delays()
        for attempt in range(1, self.attempts + 1):
            start = part.stat().st_size if part.exists() else 0
            try:
                header = await self._receive_file(part, call(start), check, start, kind)
            except (grpc.aio.AioRpcError, IncompleteTransfer) as exc:
                if not is_retryable(exc) or attempt == self.attempts:
                    raise
                log.warning("download attempt %d failed (%s); resuming", attempt, exc)
                await asyncio.sleep(next(delays))
                continue
            except DataLoss:
                part.unlink(missing_ok=True)
                raise
            part.replace(dest)
            return header
        raise AssertionError("unreachable")

    async def _receive_file(
        self, part: Path, call: Any, check: Callable[[Any], None], start: int, kind: str
    ) -> Any:
        header: Any = None
        received = TRANSFER_BYTES.labels(direction="received", kind=kind, **self.labels)
        hasher = sha256_file(part, start) if start else hashlib.sha256()
        offset = start
        with open(part, "ab") as f:  # noqa: ASYNC230 - local file, chunk-sized writes (see server/uploads.py)
            f.truncate(start)
            async for msg in call:
                if msg.WhichOneof("message") == "header":
                    header = msg.header
                    check(header)
                    continue
                if header is None or msg.chunk.offset != offset:
                    raise InvalidArgument("download stream out of order")
                f.write(msg.chunk.data)
                hasher.update(msg.chunk.data)
                received.inc(len(msg.chunk.data))
                offset += len(msg.chunk.data)
        if header is None or offset != header.total_bytes:
            total = header.total_bytes if header else "?"
            raise IncompleteTransfer(f"download ended at {offset} of {total} bytes")
        if hasher.digest() != header.sha256:
            raise DataLoss(f"downloaded {part.name} does not match its sha256")
        return header


def _own_labels(tls: TlsFiles) -> dict[str, str]:
    """cloud/agent labels from the SPIFFE id in our own certificate (empty if it has none)."""
    labels = {"cloud": "", "agent": ""}
    with contextlib.suppress(OSError, ValueError):
        ids = spiffe_ids_of(x509.load_pem_x509_certificate(Path(tls.cert).read_bytes()))
        if len(ids) == 1:
            labels.update(peer_labels(SpiffeId.parse(ids[0])))
    return labels


def _status_lost_to_late_write(exc: grpc.aio.AioRpcError) -> bool:
    """grpc aio reports INTERNAL when a write races the server ending the call (grpc/grpc#36066)."""
    return exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (exc.details() or "")


def _complete_header(path: Path, header: pb.UploadHeader) -> pb.UploadHeader:
    """Fill size and digest from the file; a digest computed while writing it is kept."""
    out = pb.UploadHeader()
    out.CopyFrom(header)
    out.total_bytes = path.stat().st_size
    if not out.sha256:
        out.sha256 = sha256_file(path).digest()
    return out
