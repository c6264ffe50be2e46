"""Booting a device that a thread we gave up on still holds, without a device attached."""

from __future__ import annotations

import threading

import depthai as dai
import pytest

from agent.cameras.depthai.device import Boot, BootAbandoned, DeviceBusy

TARGET = "14442C10D13EABCE00"


def _boot(lock: threading.Lock) -> Boot:
    return Boot(dai.Pipeline(), target=TARGET, streams=["CAM_A"], device_lock=lock, wait=0.05)


def test_a_device_held_by_an_abandoned_boot_is_busy() -> None:
    lock = threading.Lock()
    # held as by a boot thread still inside dai.Device(...)
    with lock, pytest.raises(DeviceBusy) as caught:
        _boot(lock).run()
    assert caught.value.target == TARGET
    # the text a deploy_failed event carries, as before it had a class of its own
    assert str(caught.value) == "the device is still busy with an earlier boot that timed out"


def test_a_boot_abandoned_while_waiting_never_opens_the_device() -> None:
    lock = threading.Lock()
    boot = _boot(lock)
    assert boot.abandon() is None  # nothing had opened
    with pytest.raises(BootAbandoned) as caught:
        boot.run()
    assert caught.value.target == TARGET
    assert not lock.locked()
