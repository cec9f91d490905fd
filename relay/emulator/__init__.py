"""An emulated ComfyUI server for tests, demos and development without a GPU.

It speaks ComfyUI's HTTP and WebSocket protocol as the current release (0.38) has it, or as
0.3.64 did (``comfyui_version="0.3.64"``, held to the recordings in ``shared/comfyui/traces``):
the same messages in the same order, the same routing rules (including the duplicate-clientId
quirk), the same validation errors, and real image files.

Use :func:`run_emulator` to start one in-process (port 0 by default), or the
``comfy-relay emulator`` command to run it standalone.
"""

from relay.emulator.config import EmulatorConfig
from relay.emulator.harness import RunningEmulator, run_emulator
from relay.emulator.server import create_app

__all__ = ["EmulatorConfig", "RunningEmulator", "create_app", "run_emulator"]
