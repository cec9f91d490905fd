"""What an emulated node type is: its input specs, outputs and simulated behaviour.

A node type is a subclass of :class:`Node` registered in a :class:`Catalogue`. Input specs
publish through ``/object_info`` in ComfyUI's shape (``["INT", {"default": ..}]``, combos as
``[[choices], {..}]``) and drive the same validation the real server performs.

Adding a node type::

    class Sharpen(Node):
        class_type = "Sharpen"
        category = "image/postprocessing"
        required = {"image": Input("IMAGE"), "amount": Input.float(1.0, 0.0, 5.0, 0.1)}
        returns = ("IMAGE",)
        seconds = 0.05

        async def run(self, ctx: RunContext, image: ImageBatch, amount: float) -> NodeResult:
            await ctx.work(self.seconds)
            return NodeResult((image,))

    catalogue.register(Sharpen)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from PIL import Image

from relay.emulator.files import Folders

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
]

ImageBatch = list[Image.Image]
# A live preview: format ("JPEG"/"PNG"), the picture, and the size to fit it into (None keeps it).
Preview = tuple[str, Image.Image, int | None]

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A loaded model, clip, vae, controlnet... in the emulator: only its name."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Conditioning:
    text: str
    strength: float = 1.0


@dataclass(slots=True)
class Latent:
    """A latent batch. ``images`` holds what decoding it gives (None before sampling)."""

    width: int
    height: int
    batch: int
    images: ImageBatch | None = None
    mask: Image.Image | None = None


@dataclass(frozen=True, slots=True)
class NodeEnv:
    """What node types may read about the server: its folders and model lists."""

    folders: Folders
    models: Mapping[str, tuple[str, ...]]

    def model_list(self, folder: str) -> list[str]:
        return list(self.models.get(folder, ()))


@dataclass(frozen=True, slots=True)
class NodeResult:
    """A node's outputs (one per declared return) and its UI dict for output nodes."""

    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


class RunContext(Protocol):
    """What a running node can do. Provided by the executor."""

    node_id: str
    prompt_id: str
    prompt: dict[str, Any]
    env: NodeEnv

    async def work(self, seconds: float) -> None:
        """Simulate ``seconds`` of work (divided by the emulator's speed factor)."""

    def check_interrupt(self) -> None:
        """Raise if an interrupt was requested, as ComfyUI's processing checks do."""

    async def progress(self, value: int, total: int, preview: Preview | None = None) -> None:
        """Report progress (checks for interrupt first), optionally with a preview image."""

    async def text(self, text: str) -> None:
        """Send a progress-text frame for this node (broadcast to every socket)."""

    async def activity(self, activity: str | None) -> None:
        """Say what the node spends its time on ("loading"), None when done; servers that
        report activity (current ComfyUI) send it in ``progress_state``."""


ChoiceSource = Callable[[NodeEnv], list[str]]


@dataclass(frozen=True, slots=True)
class Input:
    """One input spec: a type name (``"INT"``, ``"IMAGE"``, ``"*"``...) or a combo of choices.

    ``choices`` may be a callable, for lists that depend on the server (model files, inputs).
    ``bare`` publishes the spec without its options dict, as some real nodes do.
    """

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] | ChoiceSource | None = None
    bare: bool = False

    # Constructors for the common widget types.
    @classmethod
    def int(
        cls, default: int = 0, lo: int = 0, hi: int = MAX_SEED, step: int | None = None, **extra: Any
    ) -> Input:
        options: dict[str, Any] = {"default": default, "min": lo, "max": hi}
        if step is not None:
            options["step"] = step
        return cls("INT", {**options, **extra})

    @classmethod
    def float(cls, default: float, lo: float, hi: float, step: float | None = None, **extra: Any) -> Input:
        options: dict[str, Any] = {"default": default, "min": lo, "max": hi}
        if step is not None:
            options["step"] = step
        return cls("FLOAT", {**options, **extra})

    @classmethod
    def string(cls, default: str = "", **extra: Any) -> Input:
        return cls("STRING", {"default": default, **extra} if default or extra else {})

    @classmethod
    def boolean(cls, default: bool) -> Input:
        return cls("BOOLEAN", {"default": default})

    @classmethod
    def combo(cls, choices: tuple[str, ...] | ChoiceSource, **options: Any) -> Input:
        # A combo without options is published as just its list: [["a", "b"]].
        return cls("COMBO", options, choices=choices, bare=not options)

    @classmethod
    def model_file(cls, folder: str) -> Input:
        return cls.combo(lambda env: env.model_list(folder))

    @property
    def is_combo(self) -> bool:
        return self.choices is not None

    def choice_list(self, env: NodeEnv) -> list[str]:
        if self.choices is None:
            return []
        return list(self.choices(env) if callable(self.choices) else self.choices)

    def published(self, env: NodeEnv) -> list[Any]:
        """The spec as /object_info shows it."""
        head: Any = self.choice_list(env) if self.is_combo else self.kind
        if self.bare and not self.options:
            return [head]
        return [head, dict(self.options)]


class Node(ABC):
    """Base of every emulated node type. Subclasses set the class attributes and ``run``."""

    class_type: ClassVar[str]
    display_name: ClassVar[str | None] = None
    category: ClassVar[str] = "emulated"
    description: ClassVar[str] = ""
    python_module: ClassVar[str] = "nodes"
    output_node: ClassVar[bool] = False
    # Nodes whose result must never be reused across prompts even with equal inputs.
    not_idempotent: ClassVar[bool] = False
    required: ClassVar[Mapping[str, Input]] = {}
    optional: ClassVar[Mapping[str, Input]] = {}
    hidden: ClassVar[Mapping[str, str]] = {}
    returns: ClassVar[tuple[str, ...]] = ()
    return_names: ClassVar[tuple[str, ...] | None] = None
    # Inputs checked by ``validate_inputs`` instead of the generic type/range/list checks.
    custom_validated: ClassVar[frozenset[str]] = frozenset()
    # Simulated duration in seconds at speed 1, for nodes whose run uses it.
    seconds: ClassVar[float] = 0.0
    # Nodes written against ComfyUI's newer node API publish a few more keys and a null
    # display name when they have none (ImageBlur in trace 13).
    v3: ClassVar[bool] = False

    def validate_inputs(self, env: NodeEnv, values: Mapping[str, Any]) -> dict[str, str]:
        """Custom validation: input name -> message, for the inputs that fail."""
        return {}

    def fingerprint(self, env: NodeEnv, values: Mapping[str, Any]) -> object:
        """Extra cache key material, like ComfyUI's IS_CHANGED (a file's hash for LoadImage)."""
        return None

    @abstractmethod
    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        """Simulate the node: do its (scaled) work, report progress, return outputs and UI."""

    @classmethod
    def input_spec(cls, name: str) -> Input | None:
        return cls.required.get(name) or cls.optional.get(name)

    @classmethod
    def object_info(cls, env: NodeEnv) -> dict[str, Any]:
        inputs: dict[str, Any] = {"required": {k: v.published(env) for k, v in cls.required.items()}}
        order: dict[str, list[str]] = {"required": list(cls.required)}
        if cls.optional:
            inputs["optional"] = {k: v.published(env) for k, v in cls.optional.items()}
            order["optional"] = list(cls.optional)
        if cls.hidden:
            inputs["hidden"] = dict(cls.hidden)
            order["hidden"] = list(cls.hidden)
        info: dict[str, Any] = {
            "input": inputs,
            "input_order": order,
            "output": list(cls.returns),
            "output_is_list": [False] * len(cls.returns),
            "output_name": list(cls.return_names or cls.returns),
        }
        if cls.v3:
            info["output_tooltips"] = [None] * len(cls.returns)
        info.update(
            name=cls.class_type,
            display_name=cls.display_name if cls.display_name is not None or cls.v3 else cls.class_type,
            description=cls.description,
            python_module=cls.python_module,
            category=cls.category,
            output_node=cls.output_node,
        )
        if cls.v3:
            info.update(deprecated=False, experimental=False, api_node=False)
        return info


class Catalogue:
    """The node types a server knows, by class_type."""

    def __init__(self) -> None:
        self._types: dict[str, type[Node]] = {}

    def register(self, *node_types: type[Node]) -> None:
        for node_type in node_types:
            self._types[node_type.class_type] = node_type

    def get(self, class_type: str) -> type[Node] | None:
        return self._types.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._types

    def __iter__(self) -> Any:
        return iter(self._types)

    def object_info(self, env: NodeEnv) -> dict[str, Any]:
        return {name: node_type.object_info(env) for name, node_type in self._types.items()}


def megapixels(width: int, height: int) -> float:
    return max(0.01, width * height / 1_048_576)


def seconds_for(base: float, per_megapixel: float, width: int, height: int) -> float:
    """A duration that grows with picture size, for decoders and samplers."""
    return base + per_megapixel * megapixels(width, height)


def input_path(env: NodeEnv, name: str) -> Path:
    return env.folders.resolve_annotated(name)


def finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0
