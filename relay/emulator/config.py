"""Settings of the emulated ComfyUI server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["CURRENT_VERSION", "DEFAULT_MODELS", "PROFILES", "ComfyVersion", "EmulatorConfig", "OutputOrder"]

OutputOrder = Literal["stable", "random"]
# Which ComfyUI the emulator is: the recorded 0.3.64, or the current release (docs/emulator.md).
ComfyVersion = Literal["0.3.64", "current"]
PROFILES: tuple[ComfyVersion, ...] = ("current", "0.3.64")
# The release the "current" profile stands for.
CURRENT_VERSION = "0.38.1"

# Model files the emulated server pretends to have, by folder (GET /models/{folder}).
DEFAULT_MODELS: dict[str, tuple[str, ...]] = {
    "checkpoints": (
        "sd_xl_base_1.0.safetensors",
        "v1-5-pruned-emaonly.safetensors",
        "realisticVisionV60B1_v51HyperVAE.safetensors",
    ),
    "configs": (),
    "loras": ("add_detail.safetensors", "lcm_lora_sdxl.safetensors"),
    "vae": ("sdxl_vae.safetensors", "ae.safetensors"),
    "text_encoders": ("clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"),
    "diffusion_models": ("flux1-fill-dev.safetensors",),
    "clip_vision": (),
    "style_models": (),
    "embeddings": (),
    "diffusers": (),
    "vae_approx": (),
    "controlnet": (
        "control_v11p_sd15_canny.pth",
        "controlnet-union-sdxl-1.0.safetensors",
        "FLUX.1-dev-ControlNet-Union-Pro.safetensors",
    ),
    "gligen": (),
    "upscale_models": ("RealESRGAN_x4plus.pth",),
    "custom_nodes": (),
    "hypernetworks": (),
    "photomaker": (),
    "classifiers": (),
    "model_patches": (),
    "audio_encoders": (),
    # Folders of the node packs the pipelines in workflows/ use.
    "gguf": ("flux1-dev-Q8_0.gguf", "flux1-schnell-Q4_K_S.gguf"),
    "ultralytics": (
        "bbox/face_yolov8m.pt",
        "bbox/hand_yolov8s.pt",
        "bbox/product_yolov8s.pt",
        "segm/person_yolov8m-seg.pt",
    ),
    "animatediff_models": ("mm_sd_v15_v2.ckpt", "v3_sd15_mm.ckpt"),
}


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How the emulated server behaves.

    The defaults reproduce a current ComfyUI started with no flags (``comfyui_version``
    "0.3.64" the recorded one). Paths left as ``None`` are created under a fresh temporary
    folder when the server starts.
    """

    comfyui_version: ComfyVersion = "current"

    host: str = "127.0.0.1"
    port: int = 8188
    # Divides every simulated duration: 10.0 runs a graph ten times faster.
    speed: float = 1.0
    output_dir: Path | None = None
    input_dir: Path | None = None
    temp_dir: Path | None = None
    # --max-upload-size in MB. ComfyUI's default is the int 100; a value given on its
    # command line is a float, and /features then reports a float (trace 15).
    max_upload_size_mb: float = 100
    # --enable-cors-header: None keeps the loopback Origin check, "*" or an origin enables CORS.
    cors_origin: str | None = None
    # --enable-compress-response-body: deflate/gzip for JSON and text/plain bodies.
    compress_responses: bool = False
    # A second socket with the same clientId silently replaces the first, and closing the
    # replaced one unregisters the replacement (PROTOCOL.md §2). Off only for tests that
    # want a well-behaved server.
    duplicate_client_quirk: bool = True
    # Order of independent output nodes. ComfyUI takes it from a Python set, so it changes
    # between server processes; "stable" is highest node id first (what the recorded server
    # did), "random" shuffles per prompt like a fresh ComfyUI process would.
    output_order: OutputOrder = "stable"
    seed: int | None = None
    models: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    history_size: int = 10_000

    @property
    def current(self) -> bool:
        return self.comfyui_version == "current"

    @property
    def version(self) -> str:
        """What /system_stats reports as ``comfyui_version``."""
        return CURRENT_VERSION if self.current else "0.3.64"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_size_mb * 1024 * 1024)

    @property
    def advertised_upload_size(self) -> int | float:
        """``max_upload_size`` as /features and the feature_flags reply carry it."""
        value = self.max_upload_size_mb * 1024 * 1024
        return int(value) if isinstance(self.max_upload_size_mb, int) else float(value)
