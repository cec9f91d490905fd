"""Built-in image and file nodes: the ones the recorded graphs use and common graphs need."""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageFilter, ImageOps

from relay.emulator import images
from relay.emulator.nodes.base import (
    ImageBatch,
    Input,
    Node,
    NodeEnv,
    NodeResult,
    RunContext,
    input_path,
)

__all__ = ["IMAGING_NODES"]

_SIZE = {"min": 1, "max": 16384, "step": 1}


class EmptyImage(Node):
    class_type = "EmptyImage"
    category = "image"
    required: ClassVar[Mapping[str, Input]] = {
        "width": Input("INT", {"default": 512, **_SIZE}),
        "height": Input("INT", {"default": 512, **_SIZE}),
        "batch_size": Input("INT", {"default": 1, "min": 1, "max": 4096}),
        "color": Input("INT", {"default": 0, "min": 0, "max": 16777215, "step": 1, "display": "color"}),
    }
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        picture = images.solid(inputs["width"], inputs["height"], inputs["color"])
        return NodeResult(([picture.copy() for _ in range(inputs["batch_size"])],))


class ImageInvert(Node):
    class_type = "ImageInvert"
    display_name = "Invert Image"
    category = "image"
    required: ClassVar[Mapping[str, Input]] = {"image": Input("IMAGE", bare=True)}
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["image"]
        return NodeResult(([ImageOps.invert(i.convert("RGB")) for i in batch],))


class ImageScale(Node):
    class_type = "ImageScale"
    display_name = "Upscale Image"
    category = "image/upscaling"
    required: ClassVar[Mapping[str, Input]] = {
        "image": Input("IMAGE", bare=True),
        "upscale_method": Input.combo(("nearest-exact", "bilinear", "area", "bicubic", "lanczos")),
        "width": Input("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
        "height": Input("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
        "crop": Input.combo(("disabled", "center")),
    }
    returns = ("IMAGE",)
    _filters: ClassVar[dict[str, Image.Resampling]] = {
        "nearest-exact": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "area": Image.Resampling.BOX,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["image"]
        out = []
        for picture in batch:
            width, height = inputs["width"], inputs["height"]
            if width == 0 and height == 0:
                out.append(picture)
                continue
            if width == 0:
                width = max(1, round(picture.width * height / picture.height))
            if height == 0:
                height = max(1, round(picture.height * width / picture.width))
            method = self._filters[inputs["upscale_method"]]
            if inputs["crop"] == "center":
                out.append(ImageOps.fit(picture, (width, height), method))
            else:
                out.append(picture.resize((width, height), method))
        return NodeResult((out,))


class ImageBlur(Node):
    class_type = "ImageBlur"
    category = "image/postprocessing"
    v3 = True
    python_module = "comfy_extras.nodes_post_processing"
    required: ClassVar[Mapping[str, Input]] = {
        "image": Input("IMAGE"),
        "blur_radius": Input("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
        "sigma": Input.float(1.0, 0.1, 10.0, 0.1),
    }
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        radius = inputs["blur_radius"] * inputs["sigma"] / 2
        return NodeResult(([i.filter(ImageFilter.GaussianBlur(radius)) for i in inputs["image"]],))


class ImageAddNoise(Node):
    class_type = "ImageAddNoise"
    category = "image"
    python_module = "comfy_extras.nodes_images"
    required: ClassVar[Mapping[str, Input]] = {
        "image": Input("IMAGE", bare=True),
        "seed": Input.int(0, control_after_generate=True),
        "strength": Input.float(0.5, 0.0, 1.0, 0.01),
    }
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        out = [
            images.blend(p, images.noise(p.width, p.height, inputs["seed"] + n), inputs["strength"])
            for n, p in enumerate(inputs["image"])
        ]
        return NodeResult((out,))


class GetImageSize(Node):
    class_type = "GetImageSize"
    display_name = "Get Image Size"
    category = "image"
    python_module = "comfy_extras.nodes_images"
    required: ClassVar[Mapping[str, Input]] = {"image": Input("IMAGE", bare=True)}
    hidden: ClassVar[Mapping[str, str]] = {"unique_id": "UNIQUE_ID"}
    returns = ("INT", "INT", "INT")
    return_names = ("width", "height", "batch_size")

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["image"]
        width, height = batch[0].size
        # The exact text the real node sends, leading space before "batch" included (trace 02c).
        await ctx.text(f"width: {width}, height: {height}\n batch size: {len(batch)}")
        return NodeResult((width, height, len(batch)))


class LoadImage(Node):
    class_type = "LoadImage"
    display_name = "Load Image"
    category = "image"
    required: ClassVar[Mapping[str, Input]] = {
        "image": Input.combo(lambda env: env.folders.input_files(), image_upload=True),
    }
    returns = ("IMAGE", "MASK")
    custom_validated = frozenset({"image"})
    seconds = 0.02

    def validate_inputs(self, env: NodeEnv, values: Mapping[str, Any]) -> dict[str, str]:
        name = values.get("image")
        if not isinstance(name, str) or not input_path(env, name).is_file():
            return {"image": f"Invalid image file: {name}"}
        return {}

    def fingerprint(self, env: NodeEnv, values: Mapping[str, Any]) -> object:
        path = input_path(env, str(values.get("image")))
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        with Image.open(input_path(ctx.env, inputs["image"])) as opened:
            picture = ImageOps.exif_transpose(opened) or opened
            picture.load()
            if "A" in picture.getbands():
                mask = ImageOps.invert(picture.getchannel("A"))
            else:
                mask = Image.new("L", picture.size, 0)
            rgb = picture.convert("RGB")
        return NodeResult(([rgb], [mask]))


class _ImageSaver(Node):
    """Shared by SaveImage and PreviewImage: writes PNGs and reports them in the UI dict."""

    output_node = True
    file_type: ClassVar[str] = "output"
    compress_level: ClassVar[int] = 4
    hidden: ClassVar[Mapping[str, str]] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    seconds = 0.01

    def prefix(self, inputs: Mapping[str, Any]) -> str:
        return str(inputs.get("filename_prefix", "ComfyUI"))

    def folder(self, ctx: RunContext) -> Path:
        folder = ctx.env.folders.by_type(self.file_type)
        assert folder is not None
        return folder

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds * len(inputs["images"]))
        target = ctx.env.folders.save_path(self.prefix(inputs), self.folder(ctx))
        target.folder.mkdir(parents=True, exist_ok=True)
        results = []
        for offset, picture in enumerate(inputs["images"]):
            filename = f"{target.filename_base}_{target.counter + offset:05}_.png"
            data = images.png_with_prompt(picture, ctx.prompt, self.compress_level)
            (target.folder / filename).write_bytes(data)
            results.append({"filename": filename, "subfolder": target.subfolder, "type": self.file_type})
        return NodeResult((), {"images": results})


class SaveImage(_ImageSaver):
    class_type = "SaveImage"
    display_name = "Save Image"
    category = "image"
    description = "Saves the input images to the output directory."
    required: ClassVar[Mapping[str, Input]] = {
        "images": Input("IMAGE"),
        "filename_prefix": Input.string("ComfyUI"),
    }


class PreviewImage(_ImageSaver):
    class_type = "PreviewImage"
    display_name = "Preview Image"
    category = "image"
    description = "Saves the input images to the temp directory."
    required: ClassVar[Mapping[str, Input]] = {"images": Input("IMAGE", bare=True)}
    file_type = "temp"
    compress_level = 1

    def __init__(self) -> None:
        # One random suffix per node instance, kept while the node stays in consecutive
        # prompts: "ComfyUI_temp_fforr_00001_.png", then "..._00002_.png" (trace 13).
        suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        self.temp_prefix = f"ComfyUI_temp_{suffix}"

    def prefix(self, inputs: Mapping[str, Any]) -> str:
        return self.temp_prefix


class SaveImageWebsocket(Node):
    """Sends each image as a full-size PNG preview frame instead of writing a file (trace 02c, 14)."""

    class_type = "SaveImageWebsocket"
    category = "api/image"
    python_module = "custom_nodes.websocket_image_save"
    output_node = True
    required: ClassVar[Mapping[str, Input]] = {"images": Input("IMAGE", bare=True)}

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["images"]
        for step, picture in enumerate(batch):
            await ctx.progress(step, len(batch), ("PNG", picture, None))
        return NodeResult(())


class SaveAnimatedWEBP(Node):
    class_type = "SaveAnimatedWEBP"
    category = "image/animation"
    python_module = "comfy_extras.nodes_images"
    output_node = True
    required: ClassVar[Mapping[str, Input]] = {
        "images": Input("IMAGE", bare=True),
        "filename_prefix": Input.string("ComfyUI"),
        "fps": Input.float(6.0, 0.01, 1000.0, 0.01),
        "lossless": Input.boolean(True),
        "quality": Input("INT", {"default": 80, "min": 0, "max": 100}),
        "method": Input.combo(("default", "fastest", "slowest")),
    }
    hidden: ClassVar[Mapping[str, str]] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    seconds = 0.05

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["images"]
        await ctx.work(self.seconds * len(batch))
        folder = ctx.env.folders.output
        target = ctx.env.folders.save_path(inputs["filename_prefix"], folder)
        target.folder.mkdir(parents=True, exist_ok=True)
        filename = f"{target.filename_base}_{target.counter:05}_.webp"
        batch[0].save(
            target.folder / filename,
            "WEBP",
            save_all=True,
            append_images=batch[1:],
            duration=round(1000 / inputs["fps"]),
            lossless=inputs["lossless"],
            quality=inputs["quality"],
        )
        ui = {
            "images": [{"filename": filename, "subfolder": target.subfolder, "type": "output"}],
            "animated": [len(batch) > 1],
        }
        return NodeResult((), ui)


class PreviewAny(Node):
    class_type = "PreviewAny"
    display_name = "Preview Any"
    category = "utils"
    python_module = "comfy_extras.nodes_preview_any"
    output_node = True
    required: ClassVar[Mapping[str, Input]] = {"source": Input("*")}

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        return NodeResult((), {"text": [str(inputs["source"])]})


IMAGING_NODES: tuple[type[Node], ...] = (
    EmptyImage,
    ImageInvert,
    ImageScale,
    ImageBlur,
    ImageAddNoise,
    GetImageSize,
    LoadImage,
    SaveImage,
    PreviewImage,
    SaveImageWebsocket,
    SaveAnimatedWEBP,
    PreviewAny,
)
