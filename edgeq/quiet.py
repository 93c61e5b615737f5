"""Keep third-party native log chatter off the terminal unless ``-vv``.

TensorFlow, absl and LiteRT write info lines ("oneDNN custom operations are on ...", "Created TensorFlow Lite
XNNPACK delegate ...") from C++ straight to file descriptor 2; ``TF_CPP_MIN_LOG_LEVEL`` no longer stops all
of them. ``filtered_stderr()`` puts a pipe on fd 2 for the duration of a command and forwards every line
except those matching ``NOISE``, so warnings and edgeq's own errors still reach the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator

# Lines that carry no information for an edgeq user; anything else on stderr is passed through.
NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] (oneDNN custom operations are on|TensorFlow binary is optimized"
    rb"|Unable to register|computation placer|cuda|CUDA|could not open file to read NUMA"
    rb"|torchvision is not installed\. Skipping torchvision::)"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    rb"|INFO: Initialized TensorFlow Lite runtime\."
    rb"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \S+, output_inference_type: \S+"
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    # ORT's graph cleanup after shape inference (its own unused constants; nothing of the model is lost)
    rb"|(?:\x1b\[[\d;]*m)?[\d-]+ [\d:.]+ \[W:onnxruntime:[^\]]*CleanUnusedInitializersAndNodeArgs\] "
    rb"Removing initializer"
    rb")"
)


def _forward(read_fd: int, write_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not NOISE.match(line):
                    os.write(write_fd, line + b"\n")
        if pending and not NOISE.match(pending):
            os.write(write_fd, pending)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """fd 2 goes through the noise filter inside the block (only where stderr is the real fd 2)."""
    # torch 2.13's own pytree code trips its deprecation of LeafSpec on every export: nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            raise ValueError
    except (ValueError, OSError, AttributeError):  # captured (CliRunner) or detached: nothing to filter
        yield
        return
    sys.stderr.flush()
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.set_inheritable(original, False)
    forwarder = threading.Thread(target=_forward, args=(read_fd, original), name="edgeq-stderr", daemon=True)
    forwarder.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last writer closes: the forwarder drains it and ends
        forwarder.join(timeout=5)
        os.close(original)
