"""The clock that times model compute on the live timeline.

The live testbed runs the edge server and every device process on one host, while the
system it stands for gives each device, and the server, hardware of its own. On a CPU the
*wall* time of a forward therefore depends on how many other processes share the cores at
that moment: beside four drafting devices on a 2-core VM the verifier's wall time was
1.6-3x its idle value, while the CPU time of the thread that ran it stayed within a few
per cent of idle. A model on a CPU is therefore timed by its thread's CPU time (torch runs
with one intra-op thread in every live process, so that thread does all the work). On an
accelerator the CPU mostly waits, so the wall clock is the only measure; the results are
read back to the host before the clock stops, which synchronises the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def model_device_type(model) -> str:
    """``"cpu"``, ``"cuda"``, ...: where ``model``'s weights live. A wrapper that holds its
    network as ``.model`` (the reduced-vocabulary drafter, a verifier server) is looked
    through; ``cpu`` when nothing says (e.g. a test double)."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        device = getattr(model, "device", None)
        if device is None and callable(getattr(model, "parameters", None)):
            first = next(iter(model.parameters()), None)
            device = None if first is None else first.device
        if device is not None:
            return getattr(device, "type", None) or str(device)
        model = getattr(model, "model", None)
        if model is None:
            break
    return "cpu"


def compute_clock(model) -> Callable[[], float]:
    """The clock to time ``model``'s compute with: thread CPU time on a CPU, else wall time."""
    return time.thread_time if model_device_type(model) == "cpu" else time.perf_counter
