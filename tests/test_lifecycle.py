"""The steps of a request's life on one camera's slots: pure, so without a camera or a loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import CameraOffline, error_info
from agent.lifecycle import Slots
from agent.messages import YoloConfig, YoloOptions
from agent.requests import Phase, Request
from tests.requestgen import (
    FAILED,
    delete,
    deploy,
    deployment,
    model,
    running,
    states,
    written,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.cameras.base import Deployment


def test_a_deploy_is_accepted_by_the_write_then_applied() -> None:
    slots = Slots()
    slots.booted = True
    request = deploy("r")
    slots.stage(request)
    phases = [request.phase]
    assert (slots.has_unwritten(), slots.has_staged()) == (True, True)
    assert slots.in_flight() == [request]  # only the last write at shutdown sees a staged one
    assert states(slots.prepare()) == [("r", "accepted")]
    phases.append(request.phase)
    assert (slots.has_unwritten(), slots.in_write()) == (False, True)
    assert slots.desired() == {"CAM_A": request.deployment}
    assert slots.last_good() == {}
    assert slots.commit()
    phases.append(request.phase)
    assert states(slots.start_apply()) == [("r", "applying")]
    phases.append(request.phase)
    assert slots.target() == {"CAM_A": request.deployment}
    assert slots.running == {}
    assert slots.in_flight() == [request]
    assert states(slots.apply_succeeded()) == [("r", "succeeded")]
    phases.append(request.phase)
    assert phases == [Phase.STAGED, Phase.WRITING, Phase.QUEUED, Phase.APPLYING, Phase.DONE]
    assert slots.running == {"CAM_A": request.deployment}
    assert slots.in_flight() == []


def test_labels_only_and_deleting_nothing_succeed_with_the_write() -> None:
    slots = running()
    relabel = deploy("relabel", labels=("person",))
    nothing = delete("nothing", stream="CAM_B")
    slots.stage(relabel)
    slots.stage(nothing)
    said = states(slots.prepare())
    assert said == [
        ("relabel", "accepted"),
        ("relabel", "succeeded"),
        ("nothing", "accepted"),
        ("nothing", "succeeded"),
    ]
    assert slots.last_good() == {"CAM_A": relabel.deployment}  # recorded by the same write
    assert slots.in_flight() == []
    assert not slots.commit()  # nothing to apply
    assert slots.running == {"CAM_A": relabel.deployment}
    assert (relabel.phase, nothing.phase) == (Phase.DONE, Phase.DONE)


def test_a_change_needs_an_apply_until_the_camera_booted_or_while_its_stream_applies() -> None:
    slots = running()
    slots.booted = False
    assert written(slots, deploy("same")) == [("same", "accepted")]
    slots.booted = True
    slots.start_apply()
    assert written(slots, deploy("again")) == [("again", "accepted")]  # waits for the apply


def test_a_queued_request_is_superseded_by_a_later_one() -> None:
    slots = running()
    first, second = deploy("first", name="b"), deploy("second", name="c")
    written(slots, first)
    slots.stage(second)
    said = slots.prepare()
    assert states(said) == [("first", "superseded"), ("second", "accepted")]
    assert said[0].event.superseded_by == "second"
    assert first.phase is Phase.DONE
    assert slots.desired() == {"CAM_A": second.deployment}
    assert slots.in_flight() == [second]
    slots.commit()
    assert states(slots.start_apply()) == [("second", "applying")]


def test_requests_for_one_stream_in_one_write_keep_the_last() -> None:
    slots = running()
    one, two = deploy("one", name="b"), deploy("two", name="c")
    same = deploy("same", name="c")
    said = written(slots, one, two)
    assert said == [("one", "accepted"), ("one", "superseded"), ("two", "accepted")]
    assert states(slots.start_apply()) == [("two", "applying")]
    slots.apply_succeeded()
    # back to what runs: the queued change is superseded and nothing restarts
    written(slots, deploy("three", name="d"))
    assert written(slots, same) == [
        ("three", "superseded"),
        ("same", "accepted"),
        ("same", "succeeded"),
    ]
    assert not slots.has_queued()


def test_an_apply_takes_the_queue_in_the_order_it_was_queued() -> None:
    slots = running()
    written(slots, deploy("b", stream="CAM_B"))
    written(slots, deploy("a", name="b"))
    written(slots, deploy("c", stream="CAM_C"))
    written(slots, deploy("a2", name="c"))  # supersedes `a`: queued after `c`
    assert states(slots.start_apply()) == [("b", "applying"), ("c", "applying"), ("a2", "applying")]
    assert [r.id for r in slots.in_flight()] == ["b", "c", "a2"]
    assert states(slots.apply_succeeded()) == [
        ("b", "succeeded"),
        ("c", "succeeded"),
        ("a2", "succeeded"),
    ]
    # what runs keeps the order each stream started running in, as the state file lists it
    assert list(slots.running) == ["CAM_A", "CAM_B", "CAM_C"]
    written(slots, delete("gone"))
    slots.start_apply()
    slots.apply_succeeded()
    written(slots, deploy("back"))
    slots.start_apply()
    slots.apply_succeeded()
    assert list(slots.running) == ["CAM_B", "CAM_C", "CAM_A"]


def test_a_failed_write_refuses_its_requests_and_queues_what_they_superseded() -> None:
    slots = running()
    queued = deploy("queued", name="b")
    written(slots, queued)
    later, settles = deploy("later", name="c"), deploy("settles", stream="CAM_B")
    slots.stage(later)
    slots.stage(deploy("last", name="d"))
    slots.stage(settles)
    slots.prepare()
    refused = slots.roll_back()
    assert [r.id for r in refused] == ["later", "last", "settles"]
    assert all(r.events == [] and r.phase is Phase.DONE for r in refused)
    assert [e.state for e in queued.events] == ["accepted"]  # its `superseded` never went out
    assert queued.phase is Phase.QUEUED
    assert slots.desired() == {"CAM_A": queued.deployment}
    assert slots.in_flight() == [queued]
    assert not slots.has_staged()


def test_a_failed_apply_keeps_the_last_good_set() -> None:
    slots = running()
    bad = deploy("bad", name="b")
    written(slots, bad)
    slots.start_apply()
    said = slots.apply_failed(FAILED)
    assert states(said) == [("bad", "failed")]
    assert said[0].event.error == FAILED
    assert not slots.booted  # the camera runs nothing until the next apply
    assert slots.running["CAM_A"].request_id == "old"  # what the rollback boots
    slot = slots.get("CAM_A")
    assert slot is not None
    assert slot.failure is not None
    assert slot.failure.request is bad
    slots.start_apply()  # the rollback: nothing queued
    assert slots.apply_succeeded() == []
    assert slot.failure is not None  # until a request succeeds there


def test_an_offline_camera_fails_what_is_queued() -> None:
    slots = running()
    queued = deploy("queued", name="b")
    written(slots, queued)
    offline = error_info(CameraOffline(camera="C"))
    said = slots.fail_queued(offline)
    assert states(said) == [("queued", "failed")]
    assert said[0].event.error == offline
    assert not slots.has_queued()


def test_restored_changes_converge_silently() -> None:
    slots = Slots()
    old = deployment("old")
    change = deploy("was-interrupted", name="b")
    change.silent = True
    slots.restore({"CAM_A": old}, [change])
    assert slots.running == {"CAM_A": old}
    assert slots.desired() == {"CAM_A": change.deployment}
    assert slots.in_flight() == []  # already answered `interrupted`
    assert slots.start_apply() == []
    assert slots.apply_succeeded() == []
    assert change.events == []
    assert slots.running == {"CAM_A": change.deployment}


def test_every_model_held_anywhere_is_named() -> None:
    slots = running()
    written(slots, deploy("applying", name="b"))
    slots.start_apply()
    written(slots, deploy("queued", name="c"))
    slots.stage(deploy("writing", stream="CAM_B", name="d"))
    slots.prepare()
    slots.stage(deploy("staged", stream="CAM_C", name="e"))
    names = {d.model.sha256 for d in slots.deployments()}
    assert names == {model(m).sha256 for m in "abcde"}


_streams = st.sampled_from(["CAM_A", "CAM_B"])
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("deploy"), _streams, st.sampled_from("abc")),
        st.tuples(st.just("delete"), _streams, st.just("")),
        st.tuples(st.sampled_from(["write", "fail_write", "apply", "fail_apply", "offline"])),
    ),
    max_size=30,
)


def _models(slots: Slots) -> dict[str, str]:
    return {stream: d.model.sha256 for stream, d in slots.running.items()}


def _check_step(
    slots: Slots, requests: list[Request], before: dict[str, str], previous: dict[str, str]
) -> None:
    """After each step: every request accepted at most once and ended at most once; a stream
    whose model was replaced or removed since `before` remembers it, no other stream's
    previous model changed."""
    for request in requests:
        assert len([e for e in request.events if e.terminal]) <= 1, request.events
        assert [e.state for e in request.events].count("accepted") <= 1, request.events
    after = _models(slots)
    replaced = {stream: sha for stream, sha in before.items() if after.get(stream) != sha}
    assert slots.previous() == previous | replaced


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_every_request_ends_once(steps: list[tuple[str, ...]]) -> None:
    """Whatever happens, each request says at most one terminal event, and at most one
    request waits per stream and phase; once written and applied, all have ended."""
    slots = running()
    requests: list[Request] = []
    refused: set[str] = set()

    def write(*, fail: bool = False) -> None:
        slots.prepare()
        if fail:
            refused.update(r.id for r in slots.roll_back())
        else:
            slots.commit()

    for n, (step, *args) in enumerate(steps):
        before, previous = _models(slots), slots.previous()
        match step:
            case "deploy" | "delete":
                stream, name = args
                request = (
                    deploy(f"r{n}", stream, name) if step == "deploy" else delete(f"r{n}", stream)
                )
                requests.append(request)
                slots.stage(request)
            case "write" | "fail_write":
                write(fail=step == "fail_write")
            case "apply":
                slots.start_apply()
                slots.apply_succeeded()
                slots.booted = True
            case "fail_apply":
                slots.start_apply()
                slots.apply_failed(FAILED)
            case "offline":
                slots.fail_queued(FAILED)
        _check_step(slots, requests, before, previous)
    write()
    slots.booted = True
    slots.start_apply()
    slots.apply_succeeded()
    for request in requests:
        assert len([e for e in request.events if e.terminal]) <= 1, request.events
        if request.id in refused:
            assert request.events == []
        else:
            assert request.done, request.events
            assert request.events[0].state == "accepted"
            assert request.phase is Phase.DONE
    assert slots.in_flight() == []
    assert not slots.has_staged()


def test_each_stream_remembers_the_model_it_ran_before() -> None:
    slots = running()  # model a on CAM_A
    a, b = model("a").sha256, model("b").sha256

    def applied(*requests: Request, fail: bool = False) -> None:
        written(slots, *requests)
        slots.start_apply()
        if fail:
            slots.apply_failed(FAILED)
        else:
            slots.apply_succeeded()
        slots.booted = True

    assert slots.previous() == {}
    written(slots, deploy("relabel", labels=("person",)))  # no restart, the same model
    yolo = deploy("yolo")
    yolo.deployment = deployment(
        "yolo", nn_config=YoloConfig(nn_config=YoloOptions(num_classes=80))
    )
    applied(yolo)  # another network on the same model
    assert slots.previous() == {}
    applied(deploy("b", name="b"))
    assert slots.previous() == {"CAM_A": a}
    applied(deploy("c", name="c"), fail=True)  # still runs b
    assert slots.previous() == {"CAM_A": a}
    applied(delete("gone"))
    assert slots.previous() == {"CAM_A": b}
    applied(deploy("d", name="d"), deploy("e", stream="CAM_B", name="e"))  # onto nothing
    assert slots.previous() == {"CAM_A": b}
    applied(deploy("back", name="b"))  # a rollback: b runs, d is the one before
    assert slots.previous() == {"CAM_A": model("d").sha256}
    again = Slots()
    again.restore(slots.running, [], slots.previous())
    assert (again.running, again.previous()) == (slots.running, slots.previous())


def test_yolo_and_mobilenet_are_different_networks() -> None:
    yolo = YoloConfig(nn_config=YoloOptions(num_classes=80))
    slots = running()
    request = deploy("yolo")
    request.deployment = deployment("yolo", nn_config=yolo)
    assert written(slots, request) == [("yolo", "accepted")]


# --- a deploy whose model is on its way ------------------------------------------------------


async def _never(progress: object) -> Deployment:  # the slots never call it
    raise AssertionError


def waiting(request_id: str, stream: str = "CAM_A") -> Request:
    """A deploy accepted before its model is there."""
    return Request(id=request_id, action="deploy", camera="C", stream=stream, acquire=_never)


def test_a_deploy_waits_for_its_model_then_goes_on_without_a_second_accepted() -> None:
    slots = running()
    request = waiting("w")
    assert written(slots, request) == [("w", "accepted")]
    assert request.phase is Phase.TRANSFERRING
    assert slots.transfers() == [request]
    assert slots.transfers() == []
    assert slots.in_flight() == [request]  # a crash now answers it `interrupted`
    assert slots.desired() == slots.running  # it changes nothing yet
    assert not slots.has_queued()
    assert states(slots.progress(request, 5, 10)) == [("w", "transferring")]
    assert states(slots.progress(request, 10, 10)) == [("w", "transferring")]
    assert [e.state for e in request.events] == ["accepted", "transferring"]  # the latest kept
    arrived = deployment("w", "b")
    assert slots.model_arrived(request, arrived)
    assert request.phase in (Phase.STAGED,)  # (mypy narrowed it above)
    assert states(slots.prepare()) == []  # accepted already
    assert slots.desired() == {"CAM_A": arrived}
    assert slots.commit()
    assert states(slots.start_apply()) == [("w", "applying")]
    assert states(slots.apply_succeeded()) == [("w", "succeeded")]
    assert slots.running == {"CAM_A": arrived}


def test_a_waiting_deploy_replaces_nothing_and_is_superseded_by_any_later_request() -> None:
    slots = running()
    queued = deploy("q", name="b")
    written(slots, queued)
    request = waiting("w")
    assert written(slots, request) == [("w", "accepted")]
    assert queued.phase is Phase.QUEUED  # goes on: it came first
    later = delete("d")
    assert written(slots, later) == [
        ("w", "superseded"),
        ("q", "superseded"),
        ("d", "accepted"),
    ]
    assert request.events[-1].superseded_by == "d"
    assert not slots.model_arrived(request, deployment("w", "c"))  # too late: nothing to do
    assert states(slots.transfer_failed(request, FAILED)) == []


def test_a_failed_transfer_fails_the_request_and_changes_nothing() -> None:
    slots = running()
    request = waiting("w")
    written(slots, request)
    said = slots.transfer_failed(request, FAILED)
    assert states(said) == [("w", "failed")]
    assert said[0].event.error == FAILED
    assert request.phase is Phase.DONE
    assert slots.in_flight() == []
    assert slots.running == {"CAM_A": deployment("old", "a")}


def test_a_failed_write_stages_an_arrived_model_again_and_refuses_only_new_requests() -> None:
    slots = running()
    request = waiting("w")
    written(slots, request)
    arrived = deployment("w", "b")
    assert slots.model_arrived(request, arrived)
    new = deploy("n", stream="CAM_B")
    slots.stage(new)
    assert states(slots.prepare()) == [("n", "accepted")]
    assert slots.roll_back() == [new]  # refused; the arrived one waits for the next write
    assert request.phase is Phase.STAGED
    assert [e.state for e in request.events] == ["accepted"]
    assert slots.has_unwritten()
    assert states(slots.prepare()) == []
    assert slots.commit()
    assert slots.desired() == {"CAM_A": arrived}


def test_a_failed_write_puts_a_superseded_waiting_deploy_back() -> None:
    slots = running()
    request = waiting("w")
    written(slots, request)
    slots.stage(deploy("later", name="c"))
    assert states(slots.prepare()) == [("w", "superseded"), ("later", "accepted")]
    slots.roll_back()
    assert request.phase is Phase.TRANSFERRING
    assert [e.state for e in request.events] == ["accepted"]
    assert slots.in_flight() == [request]
    assert slots.model_arrived(request, deployment("w", "b"))


def test_an_arrived_model_waits_for_a_later_staged_request_to_supersede_it() -> None:
    slots = running()
    request = waiting("w")
    written(slots, request)
    later = deploy("later", name="c")
    slots.stage(later)
    assert not slots.model_arrived(request, deployment("w", "b"))
    assert states(slots.prepare()) == [("w", "superseded"), ("later", "accepted")]
    slots.commit()
    assert slots.desired() == {"CAM_A": later.deployment}


def test_a_later_request_in_the_same_write_supersedes_a_deploy_about_to_wait() -> None:
    slots = running()
    queued = deploy("q", name="b")
    written(slots, queued)
    request = waiting("w")
    later = deploy("n", name="c")
    slots.stage(request)
    slots.stage(later)
    assert states(slots.prepare()) == [
        ("w", "accepted"),
        ("w", "superseded"),
        ("q", "superseded"),
        ("n", "accepted"),
    ]
    assert slots.roll_back() == [request, later]  # both refused, nothing said about them
    assert (request.events, later.events) == ([], [])
    assert [e.state for e in queued.events] == ["accepted"]
    assert queued.phase is Phase.QUEUED
    request, later = waiting("w2"), deploy("n2", name="c")
    assert written(slots, request, later) == [
        ("w2", "accepted"),
        ("w2", "superseded"),
        ("q", "superseded"),
        ("n2", "accepted"),
    ]
    assert slots.transfers() == []  # superseded before it began to wait
    assert slots.desired() == {"CAM_A": later.deployment}
    assert slots.in_flight() == [later]


_steps_with_transfers = st.lists(
    st.one_of(
        st.tuples(st.just("deploy"), _streams, st.sampled_from("abc")),
        st.tuples(st.just("delete"), _streams, st.just("")),
        st.tuples(st.just("wait"), _streams, st.just("")),
        st.tuples(st.sampled_from(["arrive", "lose"]), st.integers(0, 3), st.sampled_from("abc")),
        st.tuples(st.sampled_from(["write", "fail_write", "apply", "fail_apply", "offline"])),
    ),
    max_size=40,
)


def _made(step: str, request_id: str, stream: str, name: str) -> Request:
    if step == "deploy":
        return deploy(request_id, stream, name)
    return delete(request_id, stream) if step == "delete" else waiting(request_id, stream)


def _settle(slots: Slots, write: Callable[[], None]) -> None:
    """Two writes (what was staged, then what arrived meanwhile), then one good apply."""
    write()
    write()
    slots.booted = True
    slots.start_apply()
    slots.apply_succeeded()


@settings(max_examples=400, deadline=None)
@given(_steps_with_transfers)
def test_every_request_ends_once_with_deploys_waiting_for_their_model(
    steps: list[tuple[str, ...]],
) -> None:
    """With deploys that wait for their model, arrive or fail in any order: each request is
    accepted at most once and ends at most once; when everything arrived, all have ended."""
    slots = running()
    requests: list[Request] = []
    transferring: list[Request] = []
    refused: set[str] = set()

    def write(*, fail: bool = False) -> None:
        slots.prepare()
        if fail:
            refused.update(r.id for r in slots.roll_back())
        else:
            slots.commit()
            transferring.extend(slots.transfers())

    for n, (step, *args) in enumerate(steps):
        before, previous = _models(slots), slots.previous()
        match step:
            case "deploy" | "delete" | "wait":
                stream, name = args
                request = _made(step, f"r{n}", stream, name)
                requests.append(request)
                slots.stage(request)
            case "arrive" | "lose" if transferring:
                request = transferring.pop(int(args[0]) % len(transferring))
                if step == "arrive":
                    slots.model_arrived(request, deployment(request.id, args[1]))
                else:
                    slots.transfer_failed(request, FAILED)
            case "write" | "fail_write":
                write(fail=step == "fail_write")
            case "apply":
                slots.start_apply()
                slots.apply_succeeded()
                slots.booted = True
            case "fail_apply":
                slots.start_apply()
                slots.apply_failed(FAILED)
            case "offline":
                slots.fail_queued(FAILED)
        _check_step(slots, requests, before, previous)
    write()
    while transferring:  # every model arrives in the end
        request = transferring.pop()
        slots.model_arrived(request, deployment(request.id, "a"))
    _settle(slots, write)
    for request in requests:
        assert len([e for e in request.events if e.terminal]) <= 1, request.events
        if request.id in refused:
            assert request.events == []
        else:
            assert request.done, (request.id, request.phase, request.events)
            assert request.events[0].state == "accepted"
    assert slots.in_flight() == []
    assert not slots.has_staged()
