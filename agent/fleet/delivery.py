"""Gets a rollout's model to every agent that lacks it: a chunked upload, once per agent.

Each upload runs on a connection of its own (the sender reads the agent's upload status
from its client's messages, which the rollout's connection hands to its view; a connection
that is lost is opened again twice, and only the chunks still missing are sent), in chunks
that fit the broker's packet limit: the smaller of the broker's CONNACK Maximum Packet Size
(MQTT 5) and `--max-packet` (a capped site broker behind an uncapped central one names no
limit to the controller). The cameras of one agent share its upload.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import aiomqtt
import anyio

from agent.chunkplan import DEFAULT_CHUNK_SIZE, chunk_size_for
from agent.errors import ErrorInfo
from agent.paho_fast import on_connack
from agent.sender import send_model

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.fleet.controller import Signer
    from agent.sender import ModelFile, Sent
    from agent.topics import Topics

__all__ = ["Delivered", "Uploads", "chunk_size"]

_CLOSE_SECONDS: Final = 2.0
# an upload connection that is lost is opened again, this many connections in all, after 0,
# 0.5 and 1 s: amqtt 0.12.1 drops a client whose connection it is still setting up when
# another client subscribes to a new filter meanwhile ("dictionary changed size during
# iteration" in its _handle_client_session), which two uploads at once make likely
_ATTEMPTS: Final = 3
_RETRY_SECONDS: Final = 0.5


@dataclass(frozen=True, slots=True)
class Delivered:
    """How an agent came to hold the model, or why it does not."""

    ok: bool
    # a failed upload: `rejected` when the agent refused it (nothing changed), `unknown`
    # when no final answer came (resume to learn more)
    state: Literal["rejected", "unknown"] = "rejected"
    error: ErrorInfo | None = None


_HELD: Final = Delivered(ok=True)


def chunk_size(limit: int | None, topics: Topics, model: ModelFile, *, mqtt5: bool) -> int:
    """The largest chunk of `model` that fits a packet of `limit` bytes to this agent
    (ValueError: not even 4 KiB fits)."""
    topic = topics.chunk(model.sha256, model.size)  # the longest offset
    return chunk_size_for(limit, topic, mqtt5=mqtt5, limit=DEFAULT_CHUNK_SIZE)


@dataclass(eq=False)
class Uploads:
    """The rollout's model and the agents known to hold it."""

    model: ModelFile
    open_client: Callable[[], aiomqtt.Client]  # a new, unconnected client to the broker
    mqtt5: bool
    max_packet: int | None = None  # --max-packet
    timeout: float = 120.0  # for one agent's upload to end
    signer: Signer | None = None
    model_name: str | None = None
    held: set[str] = field(default_factory=set)
    sent: dict[str, Sent] = field(default_factory=dict)  # agent -> its upload by this run
    _locks: dict[str, anyio.Lock] = field(default_factory=dict)

    def forget(self, agent_id: str) -> None:
        """The agent said it does not have the model (after all): upload it again."""
        self.held.discard(agent_id)

    async def ensure(self, agent_id: str, topics: Topics) -> Delivered:
        """Upload the model to `agent_id` unless it holds it; one upload per agent at once."""
        lock = self._locks.setdefault(agent_id, anyio.Lock())
        async with lock:
            if agent_id in self.held:
                return _HELD
            delivered = await self._upload(agent_id, topics)
            if delivered.ok:
                self.held.add(agent_id)
            return delivered

    async def _upload(self, agent_id: str, topics: Topics) -> Delivered:
        """Upload on a new connection; when that connection is lost, again on another (the
        agent keeps what arrived: only the missing chunks go), at most `_ATTEMPTS` times."""
        lost: aiomqtt.MqttError | None = None
        try:
            with anyio.fail_after(self.timeout):
                for attempt in range(_ATTEMPTS):
                    await anyio.sleep(_RETRY_SECONDS * attempt)
                    try:
                        sent = await self._attempt(topics)
                    except (aiomqtt.MqttError, BaseExceptionGroup) as exc:
                        lost = _lost(exc)
                        if lost is None:
                            raise
                        continue
                    break
                else:
                    return _unanswered(
                        agent_id,
                        f"the broker dropped the upload's connection {_ATTEMPTS} times ({lost}): "
                        "a chunk above a packet limit on the way? give --max-packet",
                    )
        except TimeoutError:
            return _unanswered(agent_id, f"the model was not stored within {self.timeout:g} s")
        except ValueError as exc:  # the packet limit leaves no room for a chunk
            return Delivered(ok=False, error=ErrorInfo("invalid_chunk", str(exc)))
        self.sent[agent_id] = sent
        status = sent.status
        if status is None:
            return _unanswered(agent_id, "no answer to the upload's manifest")
        if status.state == "stored":
            return _HELD
        error = status.error or ErrorInfo("upload_failed", f"the upload ended {status.state}")
        return Delivered(ok=False, state="rejected", error=error)

    async def _attempt(self, topics: Topics) -> Sent:
        client = self.open_client()
        limits: list[int | None] = []
        on_connack(client, limits.append)
        await client.__aenter__()
        try:
            return await self._send(client, topics, _smallest(*limits, self.max_packet))
        finally:
            with (
                anyio.move_on_after(_CLOSE_SECONDS, shield=True),
                contextlib.suppress(aiomqtt.MqttError),
            ):
                await client.__aexit__(None, None, None)

    async def _send(self, client: aiomqtt.Client, topics: Topics, limit: int | None) -> Sent:
        signer = self.signer
        return await send_model(
            client,
            topics,
            self.model,
            chunk_size=chunk_size(limit, topics, self.model, mqtt5=self.mqtt5),
            progress=_ignore,
            request_id=f"fleet-upload-{uuid.uuid4().hex[:8]}",
            model_name=self.model_name,
            sign=signer.signed if signer is not None else None,
            expires_in=signer.expires_in if signer is not None else None,
        )


def _smallest(*limits: int | None) -> int | None:
    """The tightest of the packet limits that are set; None when none is."""
    named = [limit for limit in limits if limit]
    return min(named) if named else None


def _lost(error: BaseException) -> aiomqtt.MqttError | None:
    """The lost connection `error` is, or the only kind of error its group holds."""
    if isinstance(error, aiomqtt.MqttError):
        return error
    if isinstance(error, BaseExceptionGroup):
        lost, rest = error.split(aiomqtt.MqttError)
        if lost is not None and rest is None:
            return _lost(lost.exceptions[0])
    return None


def _unanswered(agent_id: str, why: str) -> Delivered:
    return Delivered(
        ok=False,
        state="unknown",
        error=ErrorInfo("upload_unanswered", f"agent {agent_id}: {why}; resume to try again"),
    )


def _ignore(_done: int, _total: int) -> None:
    """Upload progress is not shown per chunk: the table shows `uploading`."""
