"""Node types of the image-editing and video pipelines in ``workflows/``, simulated.

Masks, detections, control maps and blends are computed for real on small pictures (so the
files a run saves look like what the pipeline does: a face kept, a background replaced), and
the durations are in the range a mid-range GPU shows. Class types, input names and output
types follow the node packs these pipelines use: the Impact Pack's Ultralytics detector and
SEGS nodes, BEN2 background removal, the ControlNet preprocessors' all-in-one node, a GGUF
checkpoint loader, AnimateDiff-Evolved and VideoHelperSuite, besides ComfyUI's own mask,
compositing and inpainting nodes.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from relay.emulator.nodes.base import (
    ImageBatch,
    Input,
    Latent,
    ModelRef,
    Node,
    NodeResult,
    RunContext,
    seconds_for,
)
from relay.emulator.nodes.diffusion import CheckpointLoaderSimple

__all__ = ["PIPELINE_NODES"]

_MASKS = ("multiply", "add", "subtract", "and", "or", "xor")
# The x/y offset inputs of ComfyUI's compositing nodes.
_OFFSET = Input("INT", {"default": 0, "min": 0, "max": 16384, "step": 1})
_BETA_SCHEDULES = (
    "autoselect", "sqrt_linear (AnimateDiff)", "linear (AnimateDiff-SDXL)", "linear (HotshotXL/default)",
    "avg(sqrt_linear,linear)", "lcm", "sqrt", "cosine", "squaredcos_cap_v2",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Detector:
    """A loaded detection model; ``target`` is what it finds (from its file name)."""

    name: str

    @property
    def target(self) -> str:
        lowered = self.name.lower()
        for target in ("face", "hand", "person", "product"):
            if target in lowered:
                return target
        return "object"


@dataclass(frozen=True, slots=True)
class Segs:
    """Detected regions of a picture: its size and one box per detection."""

    size: tuple[int, int]
    boxes: tuple[tuple[int, int, int, int], ...]
    label: str


def _box_for(target: str, width: int, height: int) -> tuple[float, float, float, float]:
    """Where the emulated detector 'finds' its target, as fractions of the picture."""
    return {
        "face": (0.36, 0.14, 0.64, 0.44),
        "hand": (0.16, 0.55, 0.32, 0.72),
        "person": (0.22, 0.08, 0.78, 0.98),
        "product": (0.30, 0.52, 0.70, 0.92),
    }.get(target, (0.25, 0.25, 0.75, 0.75))


def _mask_of(batch: Any) -> Image.Image:
    mask = batch[0] if isinstance(batch, list) else batch
    assert isinstance(mask, Image.Image)
    return mask


class GGUFCheckpointLoader(CheckpointLoaderSimple):
    """A quantized (GGUF) checkpoint: model, text encoder and VAE, slower to load."""

    class_type = "GGUFCheckpointLoader"
    display_name = "GGUF Checkpoint Loader"
    category = "loaders/gguf"
    python_module = "custom_nodes.comfyui_gguf"
    required: ClassVar[Mapping[str, Input]] = {"gguf_name": Input.model_file("gguf")}
    seconds = 3.5
    input_name = "gguf_name"


class UltralyticsDetectorProvider(Node):
    class_type = "UltralyticsDetectorProvider"
    category = "ImpactPack"
    python_module = "custom_nodes.ComfyUI-Impact-Subpack"
    required: ClassVar[Mapping[str, Input]] = {"model_name": Input.model_file("ultralytics")}
    returns = ("BBOX_DETECTOR", "SEGM_DETECTOR")
    seconds = 0.9

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        detector = Detector(inputs["model_name"])
        return NodeResult((detector, detector))


class BboxDetectorSEGS(Node):
    class_type = "BboxDetectorSEGS"
    display_name = "BBOX Detector (SEGS)"
    category = "ImpactPack/Detector"
    python_module = "custom_nodes.ComfyUI-Impact-Pack"
    required: ClassVar[Mapping[str, Input]] = {
        "bbox_detector": Input("BBOX_DETECTOR"),
        "image": Input("IMAGE"),
        "threshold": Input.float(0.5, 0.0, 1.0, 0.01),
        "dilation": Input("INT", {"default": 10, "min": -512, "max": 512, "step": 1}),
        "crop_factor": Input.float(3.0, 1.0, 100, 0.1),
        "drop_size": Input("INT", {"default": 10, "min": 1, "max": 16384, "step": 1}),
        "labels": Input.string("all", multiline=True),
    }
    returns = ("SEGS",)
    seconds = 0.45

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        picture: Image.Image = inputs["image"][0]
        detector: Detector = inputs["bbox_detector"]
        await ctx.work(seconds_for(self.seconds, 0.1, *picture.size))
        width, height = picture.size
        left, top, right, bottom = _box_for(detector.target, width, height)
        grow = inputs["dilation"]
        box = (
            max(0, int(left * width) - grow),
            max(0, int(top * height) - grow),
            min(width, int(right * width) + grow),
            min(height, int(bottom * height) + grow),
        )
        return NodeResult((Segs((width, height), (box,), detector.target),))


class SegsToCombinedMask(Node):
    class_type = "SegsToCombinedMask"
    display_name = "SEGS to MASK (combined)"
    category = "ImpactPack/Operation"
    python_module = "custom_nodes.ComfyUI-Impact-Pack"
    required: ClassVar[Mapping[str, Input]] = {"segs": Input("SEGS")}
    returns = ("MASK",)
    seconds = 0.05

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        segs: Segs = inputs["segs"]
        mask = Image.new("L", segs.size, 0)
        draw = ImageDraw.Draw(mask)
        for box in segs.boxes:
            draw.ellipse(box, fill=255)
        return NodeResult(([mask.filter(ImageFilter.GaussianBlur(4))],))


class InvertMask(Node):
    class_type = "InvertMask"
    category = "mask"
    python_module = "comfy_extras.nodes_mask"
    required: ClassVar[Mapping[str, Input]] = {"mask": Input("MASK", bare=True)}
    returns = ("MASK",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        return NodeResult(([ImageOps.invert(_mask_of(inputs["mask"]))],))


class MaskComposite(Node):
    class_type = "MaskComposite"
    category = "mask"
    python_module = "comfy_extras.nodes_mask"
    required: ClassVar[Mapping[str, Input]] = {
        "destination": Input("MASK", bare=True),
        "source": Input("MASK", bare=True),
        "x": _OFFSET,
        "y": _OFFSET,
        "operation": Input.combo(_MASKS),
    }
    returns = ("MASK",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        destination = _mask_of(inputs["destination"])
        source = Image.new("L", destination.size, 0)
        source.paste(_mask_of(inputs["source"]), (inputs["x"], inputs["y"]))
        combine = {
            "multiply": ImageChops.multiply,
            "add": ImageChops.add,
            "subtract": ImageChops.subtract,
            "and": ImageChops.darker,
            "or": ImageChops.lighter,
            "xor": ImageChops.difference,
        }[inputs["operation"]]
        return NodeResult(([combine(destination, source)],))


class Canny(Node):
    class_type = "Canny"
    category = "image/preprocessors"
    python_module = "comfy_extras.nodes_canny"
    v3 = True
    required: ClassVar[Mapping[str, Input]] = {
        "image": Input("IMAGE", {}),
        "low_threshold": Input.float(0.4, 0.01, 0.99, 0.01),
        "high_threshold": Input.float(0.8, 0.01, 0.99, 0.01),
    }
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["image"]
        await ctx.work(seconds_for(0.1, 0.1, *batch[0].size))
        return NodeResult(([_edges(picture) for picture in batch],))


def _edges(picture: Image.Image) -> Image.Image:
    edges = picture.convert("L").filter(ImageFilter.FIND_EDGES)
    return edges.point(lambda v: 255 if v > 24 else 0).convert("RGB")


def _depth(picture: Image.Image) -> Image.Image:
    grey = picture.convert("L").filter(ImageFilter.GaussianBlur(max(2, picture.width // 48)))
    return ImageOps.autocontrast(grey).convert("RGB")


class AIO_Preprocessor(Node):
    """The ControlNet preprocessors' all-in-one node: edges, depth, pose or line art by name."""

    class_type = "AIO_Preprocessor"
    display_name = "AIO Aux Preprocessor"
    category = "ControlNet Preprocessors"
    python_module = "custom_nodes.comfyui_controlnet_aux"
    PREPROCESSORS: ClassVar[tuple[str, ...]] = (
        "none",
        "CannyEdgePreprocessor",
        "DepthAnythingV2Preprocessor",
        "MiDaS-DepthMapPreprocessor",
        "LineArtPreprocessor",
        "OpenposePreprocessor",
    )
    required: ClassVar[Mapping[str, Input]] = {"image": Input("IMAGE")}
    optional: ClassVar[Mapping[str, Input]] = {
        "preprocessor": Input.combo(PREPROCESSORS, default="none"),
        "resolution": Input("INT", {"default": 512, "min": 64, "max": 16384, "step": 64}),
    }
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["image"]
        kind = inputs.get("preprocessor", "none")
        depth = "Depth" in kind
        await ctx.work(seconds_for(0.9 if depth else 0.2, 0.3 if depth else 0.1, *batch[0].size))
        if kind == "none":
            return NodeResult((list(batch),))
        make = _depth if depth else _edges
        return NodeResult(([make(picture) for picture in batch],))


class SetLatentNoiseMask(Node):
    class_type = "SetLatentNoiseMask"
    display_name = "Set Latent Noise Mask"
    category = "latent/inpaint"
    required: ClassVar[Mapping[str, Input]] = {
        "samples": Input("LATENT", bare=True),
        "mask": Input("MASK", bare=True),
    }
    returns = ("LATENT",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        latent: Latent = inputs["samples"]
        mask = _mask_of(inputs["mask"])
        return NodeResult((Latent(latent.width, latent.height, latent.batch, latent.images, mask),))


class BackgroundEraseNetwork(Node):
    """BEN2: the subject with its background removed (RGBA), and the subject's mask."""

    class_type = "BackgroundEraseNetwork"
    display_name = "Background Erase Network (BEN2)"
    category = "image/background removal"
    python_module = "custom_nodes.ComfyUI-BEN"
    required: ClassVar[Mapping[str, Input]] = {"input_image": Input("IMAGE")}
    returns = ("IMAGE", "MASK")
    return_names = ("foreground", "mask")

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        picture: Image.Image = inputs["input_image"][0]
        await ctx.work(seconds_for(0.8, 0.6, *picture.size))
        width, height = picture.size
        left, top, right, bottom = _box_for("product", width, height)
        mask = Image.new("L", picture.size, 0)
        ImageDraw.Draw(mask).rounded_rectangle(
            (left * width, top * height, right * width, bottom * height), radius=width // 20, fill=255
        )
        cutout = picture.convert("RGBA")
        cutout.putalpha(mask)
        return NodeResult(([cutout.convert("RGB")], [mask]))


class ImageCompositeMasked(Node):
    class_type = "ImageCompositeMasked"
    category = "image"
    python_module = "comfy_extras.nodes_mask"
    required: ClassVar[Mapping[str, Input]] = {
        "destination": Input("IMAGE", bare=True),
        "source": Input("IMAGE", bare=True),
        "x": _OFFSET,
        "y": _OFFSET,
        "resize_source": Input.boolean(False),
    }
    optional: ClassVar[Mapping[str, Input]] = {"mask": Input("MASK", bare=True)}
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        destination = inputs["destination"][0].copy()
        source: Image.Image = inputs["source"][0]
        if inputs["resize_source"]:
            source = source.resize(destination.size)
        mask = _mask_of(inputs["mask"]) if inputs.get("mask") is not None else None
        if mask is not None and mask.size != source.size:
            mask = mask.resize(source.size)
        destination.paste(source, (inputs["x"], inputs["y"]), mask)
        return NodeResult(([destination],))


class InpaintModelConditioning(Node):
    class_type = "InpaintModelConditioning"
    category = "conditioning/inpaint"
    required: ClassVar[Mapping[str, Input]] = {
        "positive": Input("CONDITIONING", bare=True),
        "negative": Input("CONDITIONING", bare=True),
        "vae": Input("VAE", bare=True),
        "pixels": Input("IMAGE", bare=True),
        "mask": Input("MASK", bare=True),
        "noise_mask": Input(
            "BOOLEAN",
            {"default": True, "tooltip": "Sample only inside the mask (adds a noise mask to the latent)."},
        ),
    }
    returns = ("CONDITIONING", "CONDITIONING", "LATENT")
    return_names = ("positive", "negative", "latent")

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["pixels"]
        width, height = batch[0].size
        await ctx.work(seconds_for(0.1, 0.2, width, height))
        mask = _mask_of(inputs["mask"]) if inputs["noise_mask"] else None
        latent = Latent(width, height, len(batch), list(batch), mask)
        return NodeResult((inputs["positive"], inputs["negative"], latent))


class ADE_LoadAnimateDiffModel(Node):
    class_type = "ADE_LoadAnimateDiffModel"
    display_name = "Load AnimateDiff Model 🎭🅐🅓②"
    category = "Animate Diff 🎭🅐🅓/② Gen2 nodes ②"
    python_module = "custom_nodes.ComfyUI-AnimateDiff-Evolved"
    required: ClassVar[Mapping[str, Input]] = {"model_name": Input.model_file("animatediff_models")}
    optional: ClassVar[Mapping[str, Input]] = {"ad_settings": Input("AD_SETTINGS")}
    returns = ("MOTION_MODEL_ADE",)
    return_names = ("MOTION_MODEL",)
    seconds = 1.2

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        return NodeResult((ModelRef("motion_model", inputs["model_name"]),))


class ADE_ApplyAnimateDiffModel(Node):
    class_type = "ADE_ApplyAnimateDiffModel"
    display_name = "Apply AnimateDiff Model (Adv.) 🎭🅐🅓②"
    category = "Animate Diff 🎭🅐🅓/② Gen2 nodes ②"
    python_module = "custom_nodes.ComfyUI-AnimateDiff-Evolved"
    required: ClassVar[Mapping[str, Input]] = {
        "motion_model": Input("MOTION_MODEL_ADE"),
        "start_percent": Input.float(0.0, 0.0, 1.0, 0.001),
        "end_percent": Input.float(1.0, 0.0, 1.0, 0.001),
    }
    optional: ClassVar[Mapping[str, Input]] = {"prev_m_models": Input("M_MODELS")}
    returns = ("M_MODELS",)
    seconds = 0.05

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        return NodeResult(((inputs["motion_model"],),))


class ADE_UseEvolvedSampling(Node):
    class_type = "ADE_UseEvolvedSampling"
    display_name = "Use Evolved Sampling 🎭🅐🅓②"
    category = "Animate Diff 🎭🅐🅓/② Gen2 nodes ②"
    python_module = "custom_nodes.ComfyUI-AnimateDiff-Evolved"
    required: ClassVar[Mapping[str, Input]] = {
        "model": Input("MODEL"),
        "beta_schedule": Input.combo(_BETA_SCHEDULES, default="autoselect"),
    }
    optional: ClassVar[Mapping[str, Input]] = {
        "m_models": Input("M_MODELS"),
        "context_options": Input("CONTEXT_OPTIONS"),
    }
    returns = ("MODEL",)
    seconds = 0.05

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        return NodeResult((inputs["model"],))


class VHS_VideoCombine(Node):
    """Frames to a video file, reported under ``gifs`` as VideoHelperSuite does.

    mp4/webm need an ``ffmpeg``: on PATH, else the one imageio-ffmpeg ships (the real node's
    fallback too); without either the emulator writes an animated WEBP instead and reports
    that format, rather than a file that lies.
    """

    class_type = "VHS_VideoCombine"
    display_name = "Video Combine 🎥🅥🅗🅢"
    category = "Video Helper Suite 🎥🅥🅗🅢"
    python_module = "custom_nodes.ComfyUI-VideoHelperSuite"
    output_node = True
    FORMATS: ClassVar[tuple[str, ...]] = ("image/gif", "image/webp", "video/h264-mp4", "video/webm")
    required: ClassVar[Mapping[str, Input]] = {
        "images": Input("IMAGE"),
        "frame_rate": Input.float(8.0, 1.0, 1000.0, 1.0),
        "loop_count": Input("INT", {"default": 0, "min": 0, "max": 100, "step": 1}),
        "filename_prefix": Input.string("AnimateDiff"),
        "format": Input.combo(FORMATS),
        "pingpong": Input.boolean(False),
        "save_output": Input.boolean(True),
    }
    optional: ClassVar[Mapping[str, Input]] = {"audio": Input("AUDIO"), "vae": Input("VAE")}
    hidden: ClassVar[Mapping[str, str]] = {
        "prompt": "PROMPT",
        "extra_pnginfo": "EXTRA_PNGINFO",
        "unique_id": "UNIQUE_ID",
    }
    returns = ("VHS_FILENAMES",)
    return_names = ("Filenames",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        frames: ImageBatch = list(inputs["images"])
        if inputs["pingpong"]:
            frames += frames[-2:0:-1]
        fps: float = inputs["frame_rate"]
        await ctx.work(0.2 + 0.03 * len(frames))
        file_type = "output" if inputs["save_output"] else "temp"
        folder = ctx.env.folders.by_type(file_type)
        assert folder is not None
        target = ctx.env.folders.save_path(inputs["filename_prefix"], folder)
        target.folder.mkdir(parents=True, exist_ok=True)
        wanted: str = inputs["format"]
        stem = f"{target.filename_base}_{target.counter:05}"
        fmt, filename = _write_video(frames, fps, inputs["loop_count"], wanted, target.folder / stem)
        entry = {
            "filename": filename,
            "subfolder": target.subfolder,
            "type": file_type,
            "format": fmt,
            "frame_rate": fps,
            "workflow": f"{stem}.png",
            "fullpath": str(target.folder / filename),
        }
        return NodeResult(((True, [entry["fullpath"]]),), {"gifs": [entry]})


def _ffmpeg() -> str | None:
    found = shutil.which("ffmpeg")
    if found is not None:
        return found
    try:  # optional: installed with the test extras
        bundled = importlib.import_module("imageio_ffmpeg")
    except ImportError:
        return None
    try:
        return str(bundled.get_ffmpeg_exe())
    except RuntimeError:
        return None


def _write_video(frames: ImageBatch, fps: float, loops: int, wanted: str, stem: Path) -> tuple[str, str]:
    """Write the frames in the wanted format when possible; the (format, file name) written."""
    folder, stem_name = stem.parent, stem.name
    ffmpeg = _ffmpeg()
    if wanted.startswith("video/") and ffmpeg is not None:
        extension = "webm" if wanted == "video/webm" else "mp4"
        codec = ["-c:v", "libvpx-vp9"] if extension == "webm" else ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
        with tempfile.TemporaryDirectory() as scratch:
            for number, frame in enumerate(frames):
                frame.convert("RGB").save(Path(scratch) / f"{number:05}.png")
            pattern = str(Path(scratch) / "%05d.png")
            command = [ffmpeg, "-loglevel", "error", "-y", "-framerate", f"{fps:g}", "-i", pattern,
                       *codec, f"{stem}.{extension}"]  # fmt: skip
            if subprocess.run(command, check=False, timeout=120).returncode == 0:  # noqa: S603
                return wanted, f"{stem_name}.{extension}"
    if wanted == "image/gif":
        fmt, extension = "GIF", "gif"
    else:
        fmt, extension = "WEBP", "webp"
    frames[0].save(
        folder / f"{stem_name}.{extension}",
        fmt,
        save_all=True,
        append_images=frames[1:],
        duration=round(1000 / fps),
        loop=loops,
    )
    return f"image/{extension}", f"{stem_name}.{extension}"


PIPELINE_NODES: tuple[type[Node], ...] = (
    GGUFCheckpointLoader,
    UltralyticsDetectorProvider,
    BboxDetectorSEGS,
    SegsToCombinedMask,
    InvertMask,
    MaskComposite,
    Canny,
    AIO_Preprocessor,
    SetLatentNoiseMask,
    BackgroundEraseNetwork,
    ImageCompositeMasked,
    InpaintModelConditioning,
    ADE_LoadAnimateDiffModel,
    ADE_ApplyAnimateDiffModel,
    ADE_UseEvolvedSampling,
    VHS_VideoCombine,
)
