"""Model loaders, text encoders, latents and samplers, simulated.

Durations are in the range a mid-range GPU shows for SD-class models at speed 1, so a
text-to-image run takes a few seconds and its progress is worth watching.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from PIL import Image, ImageOps

from relay.emulator import images
from relay.emulator.nodes.base import (
    Conditioning,
    ImageBatch,
    Input,
    Latent,
    ModelRef,
    Node,
    NodeResult,
    RunContext,
    seconds_for,
)

__all__ = ["DIFFUSION_NODES", "SAMPLERS", "SCHEDULERS", "CheckpointLoaderSimple"]

SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip
SCHEDULERS = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)  # fmt: skip

PREVIEW_SIZE = 512  # latent previews are fitted into 512 px, as ComfyUI's default


class CheckpointLoaderSimple(Node):
    class_type = "CheckpointLoaderSimple"
    display_name = "Load Checkpoint"
    category = "loaders"
    required: ClassVar[Mapping[str, Input]] = {"ckpt_name": Input.model_file("checkpoints")}
    returns = ("MODEL", "CLIP", "VAE")
    seconds = 1.5
    input_name: ClassVar[str] = "ckpt_name"

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.activity("loading")
        await ctx.work(self.seconds)
        await ctx.activity(None)
        name = inputs[self.input_name]
        return NodeResult((ModelRef("model", name), ModelRef("clip", name), ModelRef("vae", name)))


class _SingleLoader(Node):
    category = "loaders"
    folder: ClassVar[str]
    input_name: ClassVar[str]
    kind: ClassVar[str]

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.activity("loading")
        await ctx.work(self.seconds)
        await ctx.activity(None)
        return NodeResult((ModelRef(self.kind, inputs[self.input_name]),))


class VAELoader(_SingleLoader):
    class_type = "VAELoader"
    display_name = "Load VAE"
    required: ClassVar[Mapping[str, Input]] = {"vae_name": Input.model_file("vae")}
    returns = ("VAE",)
    folder, input_name, kind, seconds = "vae", "vae_name", "vae", 0.3


class ControlNetLoader(_SingleLoader):
    class_type = "ControlNetLoader"
    display_name = "Load ControlNet Model"
    required: ClassVar[Mapping[str, Input]] = {"control_net_name": Input.model_file("controlnet")}
    returns = ("CONTROL_NET",)
    folder, input_name, kind, seconds = "controlnet", "control_net_name", "control_net", 0.6


class UNETLoader(_SingleLoader):
    class_type = "UNETLoader"
    display_name = "Load Diffusion Model"
    category = "advanced/loaders"
    required: ClassVar[Mapping[str, Input]] = {
        "unet_name": Input.model_file("diffusion_models"),
        "weight_dtype": Input.combo(("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")),
    }
    returns = ("MODEL",)
    folder, input_name, kind, seconds = "diffusion_models", "unet_name", "model", 2.0


class LoraLoader(Node):
    class_type = "LoraLoader"
    display_name = "Load LoRA"
    category = "loaders"
    required: ClassVar[Mapping[str, Input]] = {
        "model": Input("MODEL"),
        "clip": Input("CLIP"),
        "lora_name": Input.model_file("loras"),
        "strength_model": Input.float(1.0, -100.0, 100.0, 0.01),
        "strength_clip": Input.float(1.0, -100.0, 100.0, 0.01),
    }
    returns = ("MODEL", "CLIP")
    seconds = 0.4

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        return NodeResult((inputs["model"], inputs["clip"]))


class CLIPTextEncode(Node):
    class_type = "CLIPTextEncode"
    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    required: ClassVar[Mapping[str, Input]] = {
        "text": Input("STRING", {"multiline": True, "dynamicPrompts": True}),
        "clip": Input("CLIP"),
    }
    returns = ("CONDITIONING",)
    seconds = 0.08

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        return NodeResult((Conditioning(inputs["text"]),))


class ControlNetApplyAdvanced(Node):
    class_type = "ControlNetApplyAdvanced"
    display_name = "Apply ControlNet"
    category = "conditioning/controlnet"
    required: ClassVar[Mapping[str, Input]] = {
        "positive": Input("CONDITIONING", bare=True),
        "negative": Input("CONDITIONING", bare=True),
        "control_net": Input("CONTROL_NET", bare=True),
        "image": Input("IMAGE", bare=True),
        "strength": Input.float(1.0, 0.0, 10.0, 0.01),
        "start_percent": Input.float(0.0, 0.0, 1.0, 0.001),
        "end_percent": Input.float(1.0, 0.0, 1.0, 0.001),
    }
    optional: ClassVar[Mapping[str, Input]] = {"vae": Input("VAE", bare=True)}
    returns = ("CONDITIONING", "CONDITIONING")
    return_names = ("positive", "negative")
    seconds = 0.1

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        await ctx.work(self.seconds)
        return NodeResult((inputs["positive"], inputs["negative"]))


class EmptyLatentImage(Node):
    class_type = "EmptyLatentImage"
    display_name = "Empty Latent Image"
    category = "latent"
    required: ClassVar[Mapping[str, Input]] = {
        "width": Input("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "height": Input("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "batch_size": Input("INT", {"default": 1, "min": 1, "max": 4096}),
    }
    returns = ("LATENT",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        return NodeResult((Latent(inputs["width"], inputs["height"], inputs["batch_size"]),))


class KSampler(Node):
    """Steps with a JPEG preview each, ending on a picture chosen by seed and prompt."""

    class_type = "KSampler"
    category = "sampling"
    required: ClassVar[Mapping[str, Input]] = {
        "model": Input("MODEL"),
        "seed": Input.int(0, control_after_generate=True),
        "steps": Input("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": Input.float(8.0, 0.0, 100.0, 0.1, round=0.01),
        "sampler_name": Input.combo(SAMPLERS),
        "scheduler": Input.combo(SCHEDULERS),
        "positive": Input("CONDITIONING"),
        "negative": Input("CONDITIONING"),
        "latent_image": Input("LATENT"),
        "denoise": Input.float(1.0, 0.0, 1.0, 0.01),
    }
    returns = ("LATENT",)
    # Seconds per step: a base plus a share per megapixel of latent.
    step_base: ClassVar[float] = 0.08
    step_per_megapixel: ClassVar[float] = 0.14

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        latent: Latent = inputs["latent_image"]
        positive: Conditioning = inputs["positive"]
        steps: int = inputs["steps"]
        denoise: float = inputs["denoise"]
        seed: int = inputs["seed"]
        width, height = latent.width, latent.height
        finals = [images.generated_art(width, height, seed + n, positive.text) for n in range(latent.batch)]
        if latent.images is not None and denoise < 1.0:
            finals = [
                images.blend(src, art, denoise) for src, art in zip(latent.images, finals, strict=False)
            ] or finals
        if latent.images is not None and latent.mask is not None:
            # Only the masked area is regenerated; the rest keeps the source picture.
            mask = latent.mask.convert("L").resize((width, height))
            finals = [
                Image.composite(art, src.convert("RGB").resize((width, height)), mask)
                for src, art in zip(latent.images, finals, strict=False)
            ] or finals
        preview_target = ImageOps.contain(finals[0], (PREVIEW_SIZE, PREVIEW_SIZE))
        start = images.noise(preview_target.width, preview_target.height, seed)
        # A batch (video frames) costs more per step, though less than one picture each.
        step_seconds = seconds_for(self.step_base, self.step_per_megapixel, width, height) * (
            1 + 0.25 * (latent.batch - 1)
        )
        for step in range(1, steps + 1):
            await ctx.work(step_seconds)
            frame = images.blend(start, preview_target, step / steps)
            await ctx.progress(step, steps, ("JPEG", frame, PREVIEW_SIZE))
        return NodeResult((Latent(width, height, latent.batch, finals, latent.mask),))


class VAEDecode(Node):
    class_type = "VAEDecode"
    display_name = "VAE Decode"
    category = "latent"
    required: ClassVar[Mapping[str, Input]] = {"samples": Input("LATENT"), "vae": Input("VAE")}
    returns = ("IMAGE",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        latent: Latent = inputs["samples"]
        await ctx.work(seconds_for(0.1, 0.25, latent.width, latent.height) * latent.batch)
        if latent.images is None:
            grey = Image.new("RGB", (latent.width, latent.height), (128, 128, 128))
            return NodeResult(([grey.copy() for _ in range(latent.batch)],))
        return NodeResult((list(latent.images),))


class VAEEncode(Node):
    class_type = "VAEEncode"
    display_name = "VAE Encode"
    category = "latent"
    required: ClassVar[Mapping[str, Input]] = {
        "pixels": Input("IMAGE", bare=True),
        "vae": Input("VAE", bare=True),
    }
    returns = ("LATENT",)

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        batch: ImageBatch = inputs["pixels"]
        width, height = batch[0].size
        await ctx.work(seconds_for(0.1, 0.2, width, height) * len(batch))
        return NodeResult((Latent(width, height, len(batch), list(batch)),))


DIFFUSION_NODES: tuple[type[Node], ...] = (
    CheckpointLoaderSimple,
    VAELoader,
    UNETLoader,
    LoraLoader,
    ControlNetLoader,
    CLIPTextEncode,
    ControlNetApplyAdvanced,
    EmptyLatentImage,
    KSampler,
    VAEDecode,
    VAEEncode,
)
