"""Baseline publishers, each run in its own process: `python -m bench._flood MODE ...`.

aiomqtt  pre-encoded payloads, awaiting each QoS 0 publish (what the agent's publisher does)
paho     pre-encoded payloads, paho's loop_start thread, the fastest Python MQTT publisher here
naive    the simulator's frames -> dicts -> stdlib json.dumps -> one paho publish per message

Prints one JSON line: published count, wall seconds and CPU seconds of the publishing loop
(process-wide, all threads; interpreter start-up and connecting are not included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

import aiomqtt
import anyio
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

# the simulator's own frame generator, so the naive publisher does the agent's work
from agent.cameras.simulator import _Detector

_BATCH: Final = 500  # paho: wait for the socket every this many messages (bounds its queue)
_WAIT: Final = 30.0


def _result(published: int, wall: float, cpu: float) -> None:
    print(json.dumps({"published": published, "seconds": wall, "cpu": cpu}))


async def _aiomqtt(args: argparse.Namespace, payload: bytes) -> None:
    async with aiomqtt.Client(
        args.host,
        args.port,
        identifier=f"flood-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        count = 0
        start, cpu0 = time.perf_counter(), time.process_time()
        deadline = start + args.seconds
        while count < args.max_count:
            if args.rate:  # paced: the n-th message goes at start + n / rate
                delay = start + count / args.rate - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
            await client.publish(args.topic, payload, qos=0)
            count += 1
            if count % 256 == 0 and time.perf_counter() >= deadline:
                break
        _result(count, time.perf_counter() - start, time.process_time() - cpu0)


def _paho_client(args: argparse.Namespace) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"flood-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.connect(args.host, args.port)
    client.loop_start()
    deadline = time.monotonic() + _WAIT
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise SystemExit("paho flood: no connection")
        time.sleep(0.01)
    return client


def _naive_message(make: _Detector, seq: int, started: float) -> bytes:
    output = make(seq, time.monotonic() - started)
    assert output.detections is not None
    detections = [
        {
            "label": int(row[0]),
            "confidence": round(row[1], 5),
            "coords": [round(v, 5) for v in row[2:6]],
        }
        for row in output.detections.tolist()
    ]
    message: dict[str, Any] = {
        "camera": output.camera,
        "stream": output.stream,
        "seq": output.seq,
        "ts": time.time(),
        "device_ts": output.device_ts,
        "model_sha256": "0" * 64,
        "type": "YOLO",
        "detections": detections,
    }
    return json.dumps(message).encode()


def _paho(args: argparse.Namespace, payload: bytes, *, naive: bool) -> None:
    client = _paho_client(args)
    make = _Detector(
        "NAIVE", "CAM_A", objects=args.objects, classes=80, threshold=0.5, spatial=False
    )
    count = 0
    start, cpu0 = time.perf_counter(), time.process_time()
    deadline = start + args.seconds
    info: paho.MQTTMessageInfo | None = None
    while count < args.max_count:
        body = _naive_message(make, count + 1, start) if naive else payload
        info = client.publish(args.topic, body, qos=0)
        count += 1
        if count % _BATCH == 0:
            info.wait_for_publish(_WAIT)
            if time.perf_counter() >= deadline:
                break
    if info is not None:
        info.wait_for_publish(_WAIT)
    _result(count, time.perf_counter() - start, time.process_time() - cpu0)
    client.loop_stop()
    client.disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._flood")
    parser.add_argument("mode", choices=["aiomqtt", "paho", "naive"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--payload-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-count", type=int, default=500_000)
    parser.add_argument("--rate", type=float, default=0.0, help="aiomqtt only: messages/s")
    parser.add_argument("--objects", type=int, default=3, help="naive only: per frame")
    args = parser.parse_args(argv)
    payload = args.payload_file.read_bytes()
    if args.mode == "aiomqtt":
        anyio.run(_aiomqtt, args, payload)
    else:
        _paho(args, payload, naive=args.mode == "naive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
