"""The emulated server's node catalogue."""

from relay.emulator.nodes.base import (
    Catalogue,
    Conditioning,
    ImageBatch,
    Input,
    Latent,
    ModelRef,
    Node,
    NodeEnv,
    NodeResult,
    Preview,
    RunContext,
)
from relay.emulator.nodes.diffusion import DIFFUSION_NODES
from relay.emulator.nodes.imaging import IMAGING_NODES
from relay.emulator.nodes.pipelines import PIPELINE_NODES
from relay.emulator.nodes.probe import PROBE_NODES

__all__ = [
    "Catalogue",
    "Conditioning",
    "ImageBatch",
    "Input",
    "Latent",
    "ModelRef",
    "Node",
    "NodeEnv",
    "NodeResult",
    "Preview",
    "RunContext",
    "default_catalogue",
]


def default_catalogue() -> Catalogue:
    """Every node type the emulator ships with."""
    catalogue = Catalogue()
    catalogue.register(*IMAGING_NODES, *DIFFUSION_NODES, *PIPELINE_NODES, *PROBE_NODES)
    return catalogue
