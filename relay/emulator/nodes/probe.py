"""The three probe node types installed on the recorded server (PROBE_NODES.md).

They give a server without model weights sampler-style progress, previews and failures,
and every recorded graph uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from relay.emulator import images
from relay.emulator.nodes.base import ImageBatch, Input, Node, NodeResult, Preview, RunContext

__all__ = ["PROBE_NODES"]


class SlowProgress(Node):
    """``steps`` times: wait ``delay``, check for interrupt, report progress with a preview."""

    class_type = "SlowProgress"
    display_name = "Slow Progress (probe)"
    category = "probe"
    python_module = "custom_nodes.custom_nodes_probe"
    required: ClassVar[Mapping[str, Input]] = {
        "image": Input("IMAGE", bare=True),
        "steps": Input("INT", {"default": 8, "min": 1, "max": 10000}),
        "delay": Input.float(0.2, 0.0, 60.0, 0.01),
        "preview_format": Input.combo(
            ("JPEG", "PNG", "none"),
        ),
        "preview_max_size": Input("INT", {"default": 512, "min": 0, "max": 8192}),
        "send_text": Input.boolean(False),
        "seed": Input.int(0),
    }
    hidden: ClassVar[Mapping[str, str]] = {"unique_id": "UNIQUE_ID"}
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["image"]
        steps: int = inputs["steps"]
        fmt: str = inputs["preview_format"]
        for step in range(1, steps + 1):
            await ctx.work(inputs["delay"])
            preview: Preview | None = None
            if fmt != "none":
                preview = (fmt, images.tinted(batch[0], step), inputs["preview_max_size"] or None)
            await ctx.progress(step, steps, preview)
            if inputs["send_text"]:
                await ctx.text(f"step {step}/{steps}")
        return NodeResult((batch,))


class FailAfter(Node):
    """Reports ``steps`` progress updates without previews, then raises ``RuntimeError(message)``."""

    class_type = "FailAfter"
    display_name = "Fail After (probe)"
    category = "probe"
    python_module = "custom_nodes.custom_nodes_probe"
    required: ClassVar[Mapping[str, Input]] = {
        "image": Input("IMAGE", bare=True),
        "steps": Input("INT", {"default": 2, "min": 0, "max": 1000}),
        "delay": Input.float(0.1, 0.0, 60.0, 0.01),
        "message": Input.string("deliberate failure from FailAfter"),
    }
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        steps: int = inputs["steps"]
        for step in range(1, steps + 1):
            await ctx.work(inputs["delay"])
            await ctx.progress(step, steps)
        raise RuntimeError(inputs["message"])


class NoUIOutput(Node):
    """An output node that returns no UI: no ``executed`` when fresh, ``output: null`` when cached."""

    class_type = "NoUIOutput"
    display_name = "No UI Output (probe)"
    category = "probe"
    python_module = "custom_nodes.custom_nodes_probe"
    output_node = True
    required: ClassVar[Mapping[str, Input]] = {"image": Input("IMAGE", bare=True)}

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        return NodeResult(())


PROBE_NODES: tuple[type[Node], ...] = (SlowProgress, FailAfter, NoUIOutput)
