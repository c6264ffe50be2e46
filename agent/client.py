"""A small MQTT client for trying the agent: deploy, delete, watch.

It reads host, port, prefix and agent id from the agent's own config file, so the
commands stay short; it talks MQTT 3.1.1 so it works with the embedded demo broker.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import msgspec

from agent.config import Config, load_config
from agent.messages import Event
from agent.topics import Topics

__all__ = ["add_client_commands", "run_client_command"]

_event_decoder = msgspec.json.Decoder(Event)


def add_client_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, required=True, help="the agent's TOML config")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")

    deploy = sub.add_parser("deploy", parents=[common], help="deploy a model and follow it")
    deploy.add_argument("--camera", required=True)
    deploy.add_argument("--stream", required=True)
    source = deploy.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a MyriadX .blob file")
    source.add_argument("--model-sha256", help="a model the agent already stores")
    deploy.add_argument(
        "--nn-config",
        default='{"type": "Generic"}',
        help='NNConfig as JSON, e.g. \'{"type": "MobileNet"}\'',
    )
    deploy.add_argument("--labels", help="comma-separated class names")
    deploy.add_argument("--request-id")

    delete = sub.add_parser("delete", parents=[common], help="remove a stream's model")
    delete.add_argument("--camera", required=True)
    delete.add_argument("--stream", required=True)
    delete.add_argument("--request-id")

    watch = sub.add_parser("watch", parents=[common], help="print everything the agent says")
    watch.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")


def run_client_command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        return anyio.run(_dispatch, config, args)
    except TimeoutError:
        print(f"timed out after {args.timeout:g} s", file=sys.stderr)
        return 1


async def _dispatch(config: Config, args: argparse.Namespace) -> int:
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id)
    with anyio.fail_after(args.timeout):
        async with aiomqtt.Client(
            config.mqtt.host,
            config.mqtt.port,
            username=config.mqtt.username,
            password=config.mqtt.password,
            protocol=aiomqtt.ProtocolVersion.V311,
        ) as client:
            if args.command == "watch":
                return await _watch(client, topics, args.count)
            return await _request(client, topics, args)


async def _watch(client: aiomqtt.Client, topics: Topics, count: int) -> int:
    await client.subscribe(f"{topics.base}/#")
    seen = 0
    async for message in client.messages:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        text = payload[:300].decode(errors="replace") + ("…" if len(payload) > 300 else "")
        print(f"{message.topic.value} {text}", flush=True)
        seen += 1
        if count and seen >= count:
            break
    return 0


async def _request(client: aiomqtt.Client, topics: Topics, args: argparse.Namespace) -> int:
    request_id = args.request_id or f"cli-{uuid.uuid4().hex[:12]}"
    body: dict[str, Any] = {"request_id": request_id}
    if args.command == "deploy":
        body["nn_config"] = json.loads(args.nn_config)
        if args.model is not None:
            body["model"] = args.model.read_bytes()
        else:
            body["model_sha256"] = args.model_sha256
        if args.labels:
            body["labels"] = args.labels.split(",")
    await client.subscribe(topics.events, qos=1)
    await client.publish(
        topics.command(args.camera, args.stream, args.command),
        msgspec.msgpack.encode(body),
        qos=1,
    )
    async for message in client.messages:
        if not isinstance(message.payload, bytes):
            continue
        event = _event_decoder.decode(message.payload)
        if event.request_id != request_id:
            continue
        print(message.payload.decode(), flush=True)
        if event.terminal:
            return 0 if event.state == "succeeded" else 1
    return 1
