"""The status projection and the stored form of deployments: pure functions of values."""

from __future__ import annotations

import msgspec

from agent.cameras.simulator import SimulatedCamera
from agent.config import SimulatedCamera as CameraSpec
from agent.lifecycle import Slots
from agent.messages import GenericConfig, NNStatus, OutputOptions, YoloConfig, YoloOptions
from agent.state import CameraState, StateDocument, StoredDeployment, StoredRequest
from agent.status import camera_status, nn_status, nn_statuses, routes
from agent.topics import Topics
from tests.requestgen import FAILED, delete, deploy, deployment, model, running, written


def _nn(slots: Slots, stream: str = "CAM_A") -> NNStatus:
    return nn_status(slots.get(stream))


def test_nn_status_follows_the_slot() -> None:
    slots = running()
    assert _nn(slots).state == "running"
    assert _nn(slots).request_id == "old"
    assert _nn(slots, "CAM_B") == NNStatus(state="none")
    written(slots, deploy("new", name="b"))
    queued = _nn(slots)
    assert (queued.state, queued.request_id) == ("deploying", "new")
    assert queued.model is not None
    assert queued.model.sha256 == model("b").sha256
    slots.start_apply()
    assert _nn(slots).state == "deploying"
    slots.apply_failed(FAILED)
    failed = _nn(slots)  # the previous NN is what runs again, with the error
    assert (failed.state, failed.request_id, failed.error) == ("running", "old", FAILED)


def test_nn_status_of_a_stream_that_failed_with_nothing_to_fall_back_to() -> None:
    slots = Slots()  # not booted yet: even a delete of nothing waits for the apply
    written(slots, deploy("first"), delete("gone", "CAM_B"))
    slots.start_apply()
    slots.apply_failed(FAILED)
    failed = _nn(slots)
    assert (failed.state, failed.request_id, failed.error) == ("failed", "first", FAILED)
    assert failed.model is not None
    deleted = _nn(slots, "CAM_B")  # a delete that failed: nothing ran there anyway
    assert (deleted.state, deleted.request_id, deleted.model) == ("failed", "gone", None)


def test_a_queued_delete_shows_what_runs_until_it_is_applied() -> None:
    slots = running()
    written(slots, delete("del"))
    assert _nn(slots).state == "running"
    slots.start_apply()
    slots.apply_succeeded()
    assert _nn(slots) == NNStatus(state="none")


def test_camera_status_summarises_each_stream() -> None:
    camera = SimulatedCamera(CameraSpec(mxid="C", name="front"))
    slots = running()
    nn = nn_statuses(camera.streams, slots)
    assert list(nn) == list(camera.streams)
    status = camera_status(camera, "online", nn, restarts=2, last_error=None)
    assert (status.name, status.streams, status.restarts) == ("front", camera.streams, 2)
    assert status.nn["CAM_A"].state == "running"
    assert status.nn["CAM_A"].type == "MobileNet"
    assert status.nn["CAM_A"].model_sha256 == model("a").sha256
    assert status.nn["CAM_B"].type is None


def test_routes_only_while_online() -> None:
    topics = Topics.for_agent("oak", "t")
    labelled = deployment("r", labels=("person",))
    yolo = deployment("y", nn_config=YoloConfig(nn_config=YoloOptions(num_classes=1)))
    running = {"CAM_A": labelled, "DEPTH_B_C": yolo}
    assert routes(topics, "C", "restarting", running) == {}
    assert routes(topics, "C", "offline", running) == {}
    online = routes(topics, "C", "online", running)
    assert online["CAM_A"].topic == topics.detections("C", "CAM_A")
    assert (online["CAM_A"].type, online["CAM_A"].labels) == ("MobileNet", ("person",))
    assert (online["DEPTH_B_C"].type, online["DEPTH_B_C"].model_sha256) == (
        "YOLO",
        model("a").sha256,
    )
    # detector networks are counted; a Generic one is not
    assert online["CAM_A"].counts_topic == topics.counts("C", "CAM_A")
    generic = routes(topics, "C", "online", {"CAM_C": deployment("g", nn_config=GenericConfig())})
    assert generic["CAM_C"].counts_topic is None


def test_a_state_file_from_before_output_shaping_takes_the_agents_default() -> None:
    old = deployment("r")
    raw = msgspec.json.encode(StoredDeployment.of(old))
    without = msgspec.json.encode(
        {k: v for k, v in msgspec.json.decode(raw).items() if k != "output"}
    )
    stored = msgspec.json.decode(without, type=StoredDeployment)
    assert stored.output is None
    default = OutputOptions(max_rate=5.0, on_frames=3)
    assert stored.deployment(old.model, default).output == default
    # one stored with its own output keeps it
    own = StoredDeployment.of(deployment("s", output=OutputOptions(min_confidence=0.7)))
    assert own.deployment(old.model, default).output == OutputOptions(min_confidence=0.7)


def test_a_stored_deployment_is_the_deployment_again() -> None:
    original = deployment("r", labels=("a", "b"), model_name="ssd")
    stored = StoredDeployment.of(original)
    assert (stored.sha256, stored.size, stored.request_id) == (model("a").sha256, 1, "r")
    assert stored.deployment(original.model) == original


def test_the_document_names_its_models_and_keeps_its_format() -> None:
    a, b = deployment("a"), deployment("b", name="b")
    before = model("z").sha256  # what CAM_A ran before `a`: kept for a rollback
    grouped = deploy("g", stream="CAM_B")
    grouped.group = "site"
    document = StateDocument(
        cameras={"C": CameraState.of({"CAM_A": b}, {"CAM_A": a}, {"CAM_A": before})},
        in_flight=(StoredRequest.of(deploy("r")), StoredRequest.of(grouped)),
    )
    assert document.models() == {model("a").sha256, model("b").sha256, before}
    assert CameraState.of({"CAM_A": b}, {}).previous == {}
    raw = msgspec.json.decode(msgspec.json.encode(document))
    assert raw["cameras"]["C"]["desired"]["CAM_A"] == {
        "sha256": model("b").sha256,
        "size": 1,
        "nn_config": {
            "type": "MobileNet",
            "nn_config": {"confidence_threshold": 0.5},
            "num_inference_threads": 2,
        },
        "labels": None,
        "model_name": None,
        "request_id": "b",
        "output": {
            "max_rate": None,
            "min_confidence": None,
            "counts_max_rate": 2.0,
            "on_frames": 2,
            "off_seconds": 3.0,
        },
    }
    assert raw["cameras"]["C"]["previous"] == {"CAM_A": before}
    assert raw["in_flight"] == [
        {
            "request_id": "r",
            "action": "deploy",
            "camera": "C",
            "stream": "CAM_A",
            "replies": [],
            "group": None,
        },
        {
            "request_id": "g",
            "action": "deploy",
            "camera": "C",
            "stream": "CAM_B",
            "replies": [],
            "group": "site",
        },
    ]


def test_a_state_file_from_before_previous_models_and_groups_loads() -> None:
    """`previous` and a stored request's `group` are new defaulted fields."""
    old = {
        "version": 1,
        "cameras": {"C": {"desired": {}, "last_good": {}}},
        "in_flight": [{"request_id": "r", "action": "delete", "camera": "C", "stream": "CAM_A"}],
    }
    document = msgspec.json.decode(msgspec.json.encode(old), type=StateDocument)
    assert document.cameras["C"].previous == {}
    assert document.in_flight[0].group is None
    assert document.models() == set()
