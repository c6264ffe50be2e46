"""Generate tiny MyriadX test blobs shaped like real detector networks.

No PyPI wheel ships a YOLO or MobileNet-SSD ``.blob``, so the test suite uses
these self-made ones. They have random (seeded) weights and detect nothing
useful: they only have the *shapes* depthai 2.x checks and parses, so tests can
drive the YOLO / MobileNet / generic paths of the pipeline builder without a
model download.

Produced in ``tests/data/blobs/`` (with ``SHA256SUMS``):

=================== ====================== ==========================================
blob                input (NCHW, U8)       outputs (FP16)
=================== ====================== ==========================================
yolo_tiny.blob      images 1x3x416x416     yolo_26 [1,255,26,26], yolo_13 [1,255,13,13]
                                           (YOLOv3/v4-tiny head: 80 classes, 3 anchors
                                           per side, coordinate size 4)
yolo_tiny_c2.blob   images 1x3x416x416     same, 2 classes -> 21 channels
ssd_tiny.blob       data 1x3x300x300       detection_out [1,1,100,7] (DetectionOutput,
                                           21 classes incl. background, like
                                           mobilenet-ssd)
gray_tiny.blob      input 1x1x64x64        features [1,8,32,32] (generic network)
=================== ====================== ==========================================

depthai 2.x reports the OpenVINO version of these blobs as ``VERSION_2022_1``
(``dai.OpenVINO.Blob(path).version``): OpenVINO 2021.4 and 2022.1 share the
same MyriadX blob format and depthai names the newest version that matches.

How it works
------------
The ``openvino==2021.4.2`` wheel ships the MYRIAD plugin, whose compiler runs
on the host. The networks are built with the nGraph Python API bundled in that
wheel and compiled with ``IECore.load_network(net, "MYRIAD")`` plus the
(deprecated) ``VPU_MYRIAD_PLATFORM=VPU_MYRIAD_2480`` option: with that option
the plugin falls back to a "mock" MyriadX device when none is plugged in and
still compiles the graph (after a ~5 s wait for a real device). The Python
wrapper then tries to create an infer request, which fails without hardware,
so this script redirects that one call (the PLT/GOT slot of
``IEExecNetwork::createInferRequests`` in the wrapper's extension module) to a
no-op before loading. ``ExecutableNetwork.export()`` then writes the blob.

How to run (Linux x86-64; the 2021.4 wheels exist for CPython 3.6-3.9 only)
---------------------------------------------------------------------------
::

    apt-get install -y libusb-1.0-0        # the MYRIAD plugin links against it
    python3.9 -m venv /tmp/blobgen-venv
    /tmp/blobgen-venv/bin/pip install 'openvino==2021.4.2' 'numpy==1.19.5' 'pyelftools==0.32'
    /tmp/blobgen-venv/bin/python tests/blobgen/generate.py          # from repo root

Options: ``--out DIR`` (default: ``tests/data/blobs`` next to this folder),
``--only NAME`` (repeatable). Each compile takes ~5 s, nearly all of it the
plugin looking for a device. Output is deterministic (same bytes on every
run), so ``SHA256SUMS`` only changes when this script changes.

This file is not part of the test suite and must not be imported by it: the
tests only read the committed blobs.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:
    import ngraph as ng
    from elftools.elf.elffile import ELFFile
    from ngraph.impl import Function
    from openvino.inference_engine import IECore, IENetwork, ie_api
except ImportError as exc:  # pragma: no cover - only hit when run in a wrong env
    sys.exit(f"{exc}\nRun with Python 3.9, openvino==2021.4.2 and pyelftools (see docstring).")

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "blobs"

# Compile options. Six SHAVEs / CMX slices is what Luxonis' blobconverter uses by default.
COMPILE_CONFIG = {
    "VPU_MYRIAD_PLATFORM": "VPU_MYRIAD_2480",  # MyriadX; allows compiling with no device attached
    "MYRIAD_NUMBER_OF_SHAVES": "6",
    "MYRIAD_NUMBER_OF_CMX_SLICES": "6",
}

# YOLOv3/v4-tiny geometry.
YOLO_INPUT = 416
YOLO_ANCHORS_PER_SIDE = 3
YOLO_COORDINATE_SIZE = 4

# MobileNet-SSD geometry (VOC: 20 classes + background).
SSD_INPUT = 300
SSD_NUM_CLASSES = 21
SSD_GRID = 10
SSD_BOX_SIZES = (0.1, 0.3, 0.6)
SSD_KEEP_TOP_K = 100


# --------------------------------------------------------------------------- #
# Offline compilation
# --------------------------------------------------------------------------- #

_CREATE_INFER_REQUESTS = "_ZN21InferenceEnginePython13IEExecNetwork19createInferRequestsEi"
_NOOP = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)(lambda _self, _num: None)


def _module_base(path: str) -> int:
    """Load address of a shared object already mapped into this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and int(fields[2], 16) == 0 and os.path.realpath(fields[5]) == path:
                return int(fields[0].split("-")[0], 16)
    raise RuntimeError(f"{path} is not mapped")


def disable_infer_request_creation() -> None:
    """Turn ``IEExecNetwork::createInferRequests`` of the Python wrapper into a no-op.

    ``IECore.load_network`` calls it right after the plugin has compiled the
    network; without a device it raises "Can not create infer request". The
    call goes through the extension's GOT, so rewriting that one slot is enough.
    """
    path = os.path.realpath(ie_api.__file__)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        plt_relocs = elf.get_section_by_name(".rela.plt")
        dynsym = elf.get_section(plt_relocs["sh_link"])
        got_offset = next(
            rel["r_offset"]
            for rel in plt_relocs.iter_relocations()
            if dynsym.get_symbol(rel["r_info_sym"]).name == _CREATE_INFER_REQUESTS
        )
    slot = _module_base(path) + got_offset
    page = slot & ~(mmap.PAGESIZE - 1)
    libc = ctypes.CDLL(None, use_errno=True)
    # The GOT sits in the RELRO segment (read-only after relocation): reopen it for writing.
    if libc.mprotect(ctypes.c_void_p(page), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    ctypes.c_void_p.from_address(slot).value = ctypes.cast(_NOOP, ctypes.c_void_p).value


def compile_blob(ie: IECore, func: Function, out_path: Path) -> float:
    """Compile an nGraph function for MyriadX into ``out_path``; return seconds taken."""
    net = IENetwork(Function.to_capsule(func))
    for info in net.input_info.values():
        info.precision = "U8"  # depthai feeds U8 planar frames
        info.layout = "NCHW"
    for data in net.outputs.values():
        data.precision = "FP16"
    start = time.monotonic()
    exec_net = ie.load_network(net, "MYRIAD", config=COMPILE_CONFIG)
    exec_net.export(str(out_path))
    return time.monotonic() - start


# --------------------------------------------------------------------------- #
# Networks (random weights from a fixed seed, so output is reproducible)
# --------------------------------------------------------------------------- #


def _weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def _conv(node, rng: np.random.Generator, out_ch: int, kernel: int = 1, stride: int = 1, name=None):
    in_ch = node.get_output_shape(0)[1]
    pad = kernel // 2
    named = {"name": name} if name else {}  # ngraph rejects name=None
    return ng.convolution(
        node,
        ng.constant(_weights(rng, (out_ch, in_ch, kernel, kernel))),
        strides=[stride, stride],
        pads_begin=[pad, pad],
        pads_end=[pad, pad],
        dilations=[1, 1],
        **named,
    )


def _max_pool(node, size: int):
    return ng.max_pool(node, [size, size], [0, 0], [0, 0], [size, size])


def _reshape(node, shape: list[int]):
    return ng.reshape(node, ng.constant(np.array(shape, np.int64)), special_zero=False)


def build_yolo(num_classes: int) -> Function:
    """YOLOv3/v4-tiny-shaped net: two raw heads at strides 16 and 32."""
    rng = np.random.default_rng(num_classes)
    channels = YOLO_ANCHORS_PER_SIDE * (YOLO_COORDINATE_SIZE + 1 + num_classes)
    images = ng.parameter([1, 3, YOLO_INPUT, YOLO_INPUT], np.float32, name="images")
    x = ng.relu(_conv(images, rng, 8, kernel=3, stride=2))  # 208
    x = _max_pool(x, 8)  # 26: stride 16
    head_26 = _conv(x, rng, channels, name="yolo_26")
    head_13 = _conv(_max_pool(x, 2), rng, channels, name="yolo_13")  # stride 32
    return Function([head_26, head_13], [images], f"yolo_tiny_c{num_classes}")


def _ssd_priors() -> np.ndarray:
    """SSD prior boxes as DetectionOutput wants them: [1, 2, num_priors * 4]."""
    boxes = []
    for row in range(SSD_GRID):
        for col in range(SSD_GRID):
            cx, cy = (col + 0.5) / SSD_GRID, (row + 0.5) / SSD_GRID
            for size in SSD_BOX_SIZES:
                half = size / 2
                boxes.append([cx - half, cy - half, cx + half, cy + half])
    corners = np.clip(np.array(boxes, dtype=np.float32), 0.0, 1.0).reshape(-1)
    variances = np.tile(np.array([0.1, 0.1, 0.2, 0.2], dtype=np.float32), len(boxes))
    return np.stack([corners, variances])[np.newaxis]


def build_ssd() -> Function:
    """MobileNet-SSD-shaped net ending in a DetectionOutput layer [1, 1, 100, 7]."""
    rng = np.random.default_rng(300)
    anchors = len(SSD_BOX_SIZES)
    data = ng.parameter([1, 3, SSD_INPUT, SSD_INPUT], np.float32, name="data")
    x = ng.relu(_conv(data, rng, 8, kernel=3, stride=2))  # 150
    x = _max_pool(x, 15)  # 10x10 feature map

    def flat(node):  # NCHW -> NHWC -> [1, H*W*C], the Caffe SSD "flatten" convention
        nhwc = ng.transpose(node, ng.constant(np.array([0, 2, 3, 1], np.int64)))
        return _reshape(nhwc, [1, -1])

    loc = flat(_conv(x, rng, anchors * 4, kernel=3))
    conf = flat(_conv(x, rng, anchors * SSD_NUM_CLASSES, kernel=3))
    num_priors = SSD_GRID * SSD_GRID * anchors
    scores = ng.softmax(_reshape(conf, [1, num_priors, SSD_NUM_CLASSES]), 2)
    conf = _reshape(scores, [1, -1])
    det = ng.detection_output(
        loc,
        conf,
        ng.constant(_ssd_priors()),
        {
            "num_classes": SSD_NUM_CLASSES,
            "background_label_id": 0,
            "top_k": SSD_KEEP_TOP_K,
            "keep_top_k": [SSD_KEEP_TOP_K],
            "code_type": "caffe.PriorBoxParameter.CENTER_SIZE",
            "share_location": True,
            "nms_threshold": 0.45,
            "confidence_threshold": 0.01,
            "variance_encoded_in_target": False,
            "normalized": True,
        },
        name="detection_out",
    )
    return Function([det], [data], "ssd_tiny")


def build_gray() -> Function:
    """Generic single-channel (mono camera) net."""
    rng = np.random.default_rng(1)
    image = ng.parameter([1, 1, 64, 64], np.float32, name="input")
    features = ng.relu(_conv(image, rng, 8, kernel=3, stride=2), name="features")
    return Function([features], [image], "gray_tiny")


BLOBS: dict[str, Callable[[], Function]] = {
    "yolo_tiny.blob": lambda: build_yolo(80),
    "yolo_tiny_c2.blob": lambda: build_yolo(2),
    "ssd_tiny.blob": build_ssd,
    "gray_tiny.blob": build_gray,
}


def write_sha256sums(out_dir: Path) -> None:
    lines = [
        f"{hashlib.sha256(blob.read_bytes()).hexdigest()}  {blob.name}\n"
        for blob in sorted(out_dir.glob("*.blob"))
    ]
    (out_dir / "SHA256SUMS").write_text("".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--only", action="append", choices=sorted(BLOBS), help="only this blob")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    disable_infer_request_creation()
    ie = IECore()
    for name in args.only or BLOBS:
        path = args.out / name
        seconds = compile_blob(ie, BLOBS[name](), path)
        print(f"{name}: {path.stat().st_size} bytes in {seconds:.1f} s", flush=True)
    write_sha256sums(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
