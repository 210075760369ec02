"""Model adapters: the only place that knows where each model family keeps its decoder and vision ids.

The engine sees a :class:`ModelAdapter` and nothing of LLaVA or Qwen. Where a family's decoder does
more between layers than pass the hidden states on (Qwen3-VL's DeepStack additions), the adapter
installs what follows the dropped sequence there (:meth:`ModelAdapter.install_extras`). Where a family's
vision encoder keeps its blocks, its [CLS] and its output (for dropping inside the encoder and for
VisionZip), or why it cannot take that, is its :class:`EncoderSpec`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from v2drop_eval.engine.contract import contract_error
from v2drop_eval.engine.deepstack import Positions, install_deepstack
from v2drop_eval.engine.families import FAMILIES, family_for_class, family_of_class

__all__ = ["ModelAdapter", "EncoderSpec", "adapter_for", "encoder_for", "SUPPORTED_CLASSES", "family_of_class",
           "forward_takes"]

# class name -> the adapter's family (``llava``, ``qwen2_vl``, ``qwen3_vl``), from the one family table.
SUPPORTED_CLASSES: dict[str, str] = {c: f.adapter_family for f in FAMILIES.values() for c in f.classes}


@dataclass
class EncoderSpec:
    """Where a model's vision encoder keeps what dropping inside it (``encoder_schedule=``) and VisionZip
    read and change. Two layouts:

    - ``batched`` (CLIP-ViT in LLaVA-1.5 / NeXT): ``[crops, 1 + patches, d]`` between blocks, the [CLS]
      first (never dropped); the model reads ``hidden_states[feature_index]`` of the tower's output.
    - ``packed`` (Qwen2-VL / Qwen2.5-VL ViT): ``[patches, d]`` of every image of the call, attention within
      the segments of the ``cu_seqlens`` each block gets (images or frames; Qwen2.5-VL's windows), rotary
      ``position_embeddings`` per patch, and the patch merger fusing each ``group`` of consecutive patches
      (2x2) into one LLM token: whole groups are dropped.
    """

    kind: str  # FLOPs formula: "clip", "qwen2_vl", "qwen2_5_vl"
    layout: str  # "batched" | "packed"
    tower: nn.Module  # called once per batch of crops / images; its pre-hook starts a run
    blocks: nn.ModuleList
    output: nn.Module  # batched: the tower (hidden_states in its output); packed: the patch merger
    config: Any  # the vision config
    depth: int  # encoder stages may be at blocks 1 .. depth-1 (blocks whose output the model reads)
    group: int = 1  # patches fused into one LLM token after the encoder
    prefix: int = 0  # leading tokens of each crop that are never dropped ([CLS])
    feature_index: int | None = None  # batched: the tower output's hidden_states entry the model reads
    placeholders_include_prefix: bool = False  # batched: the [CLS] reaches the LLM ("full" feature strategy)
    cls_attention_block: int | None = None  # VisionZip: the block whose [CLS] attention and keys it reads
    crops_per_image: Callable[[dict], list[int] | None] | None = None  # any-resolution crops of each image
    refusal: str | None = None  # why encoder_schedule cannot run on this model (None: it can)
    zip_refusal: str | None = None  # why VisionZip cannot run on this model (None: it can)


@dataclass
class ModelAdapter:
    family: str
    top: nn.Module  # the *ForConditionalGeneration model: sees input_ids, labels, the cache
    decoder: nn.Module  # the LLM decoder (LlamaModel, Qwen2VLTextModel, ...)
    layers: nn.ModuleList
    text_config: Any
    vision_token_ids: tuple[int, ...]  # every droppable id: images and videos
    video_token_ids: tuple[int, ...] = ()  # the subset that marks video (counted apart in the stats)
    # Family-specific wrappers: (decoder, model config, positions, drop layers) -> objects with remove().
    extras: tuple[Callable[[nn.Module, Any, Positions, tuple[int, ...]], list[Any]], ...] = ()
    encoder: EncoderSpec | None = None  # the vision encoder (None: the family's encoder is not described)
    mrope: bool = False  # the decoder's positions are M-RoPE (3 rows: time, height, width)
    # The decoder's rotary module, (hidden, position ids [B, n]) -> (cos, sin), where positions are one number
    # per token; None for multimodal rotary (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL), which cannot be renumbered.
    rotary: Callable[[Any, Any], Any] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_implementation(self) -> str:
        return str(self.text_config._attn_implementation or "eager")

    @property
    def mask_format(self) -> str:
        """How the decoder's attention takes its mask: ``padding2d`` (flash kernels: [B, S] or None),
        ``additive`` (eager: float 4D) or ``bool`` (sdpa and the like: bool 4D or None)."""
        impl = self.attn_implementation
        if "flash" in impl or ALL_MASK_ATTENTION_FUNCTIONS.get(impl) is flash_attention_mask:
            return "padding2d"
        return "additive" if impl == "eager" else "bool"

    def install_extras(self, positions: Positions, drop_layers: tuple[int, ...]) -> list[Any]:
        """Install the family's wrappers for a dropper with stages at ``drop_layers``. ``positions()`` gives
        the original positions of the hidden states now between decoder layers (None: the whole sequence).
        Returns objects with ``remove()``."""
        return [obj for install in self.extras
                for obj in install(self.decoder, self.top.config, positions, drop_layers)]


def forward_takes(model: nn.Module | type, name: str) -> bool:
    """Whether the model's ``forward`` has the argument ``name``: Qwen-VL forwards take
    ``mm_token_type_ids`` in recent transformers releases and refuse it in older ones (5.0)."""
    cls = model if isinstance(model, type) else type(model)
    return name in inspect.signature(cls.forward).parameters


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Build the adapter for a loaded model, or raise TypeError naming the supported classes."""
    fam = family_for_class(type(model).__name__)
    config = model.config
    decoder = model.model.language_model
    # Images and videos are both vision tokens (dropped alike). llava-hf configs call the ids
    # image_token_index / video_token_index in older releases, *_id in newer; LLaVA-1.5 and LLaVA-NeXT
    # have no video id, LLaVA-OneVision and LLaVA-NeXT-Video do, as do the Qwen-VLs. InternVL has none: its
    # processor writes each video frame as a run of image tokens.
    image_id = _token_id(config, "image")
    if image_id is None:
        raise contract_error(f"{type(model).__name__}'s config has no image_token_id (nor image_token_index)")
    video_id = _token_id(config, "video")
    videos = () if video_id is None else (video_id,)
    extras = (install_deepstack,) if fam.deepstack else ()
    # Renumbering needs one position per token; M-RoPE (three per token) is known from the family, since
    # transformers 5.0's rotary module does not carry mrope_section.
    rotary = None if fam.mrope else getattr(decoder, "rotary_emb", None)
    return ModelAdapter(
        encoder=encoder_for(model),
        mrope=fam.mrope,
        family=fam.adapter_family,
        top=model,
        decoder=decoder,
        layers=decoder.layers,
        text_config=decoder.config,
        vision_token_ids=(image_id, *videos),
        video_token_ids=videos,
        extras=extras,
        rotary=rotary,
    )


# Why each supported class cannot drop inside its encoder or take VisionZip (classes not named here can).
_NO_ENCODER_DROP = {
    "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision interpolates and pools its image and video features "
    "after the encoder, so a token dropped inside the encoder has no placeholder of its own",
    "LlavaNextVideoForConditionalGeneration": "LLaVA-NeXT-Video pools its video features 2x2 after the encoder, so a "
    "token dropped inside the encoder has no placeholder of its own",
    "InternVLForConditionalGeneration": "InternVL's pixel shuffle fuses 2x2 patches after the encoder; dropping whole "
    "groups inside InternViT is not implemented",
    "Qwen3VLForConditionalGeneration": "Qwen3-VL adds intermediate encoder layers to the decoder (DeepStack); "
    "dropping inside its encoder is not implemented",
    "Qwen3VLMoeForConditionalGeneration": "Qwen3-VL adds intermediate encoder layers to the decoder (DeepStack); "
    "dropping inside its encoder is not implemented",
}
_NO_CLS = ("its vision encoder has no [CLS] token, and the VisionZip authors publish no substitute signal for it "
           "(dvlab-research/VisionZip@3151f6d has LLaVA / CLIP code only)")


def encoder_for(model: nn.Module) -> EncoderSpec | None:
    """The vision encoder of ``model`` as dropping inside it and VisionZip see it; None for a family whose
    encoder is not described (every run of such a model refuses ``encoder_schedule`` and VisionZip)."""
    name = type(model).__name__
    base = model.model
    config = model.config
    if hasattr(base, "vision_tower") and type(base.vision_tower).__name__ == "CLIPVisionModel":
        tower = base.vision_tower
        inner = getattr(tower, "vision_model", tower)  # transformers 5.x flattened CLIPVisionModel
        blocks = inner.encoder.layers
        layer = getattr(config, "vision_feature_layer", -2)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        refusal = _NO_ENCODER_DROP.get(name)
        if not isinstance(layer, int):
            refusal = refusal or f"vision_feature_layer={layer} reads several encoder layers"
            layer = -1
        index = layer % (len(blocks) + 1)  # hidden_states[0] is the embeddings, [i] the output of block i-1
        zip_refusal = None
        if index < 1:
            zip_refusal = f"vision_feature_layer={layer} reads the embeddings, before any attention"
        elif name != "LlavaForConditionalGeneration":
            zip_refusal = ("VisionZip's any-resolution layout (restore_image_features_sorted: tiles without "
                           "unpadding or newline tokens, then the tiles' [CLS] and contextual tokens) is not "
                           "implemented; supported: LLaVA-1.5 (LlavaForConditionalGeneration)")
        elif strategy != "default":
            zip_refusal = (f"vision_feature_select_strategy={strategy!r} passes the [CLS] slot on to the LLM; "
                           "VisionZip needs 'default'")
        crops = _next_crops(model) if name.startswith("LlavaNext") else None
        return EncoderSpec(kind="clip", layout="batched", tower=tower, blocks=blocks, output=tower,
                           config=tower.config, depth=index, prefix=1, feature_index=index,
                           placeholders_include_prefix=strategy == "full", cls_attention_block=index - 1,
                           crops_per_image=crops, refusal=refusal, zip_refusal=zip_refusal)
    visual = getattr(base, "visual", None)
    if name in _NO_ENCODER_DROP:  # refused; its encoder's FLOPs formula is not described either
        return EncoderSpec(kind="", layout="", tower=base, blocks=nn.ModuleList(), output=base, config=None, depth=0,
                           refusal=_NO_ENCODER_DROP[name], zip_refusal=_NO_CLS)
    if visual is not None and hasattr(visual, "blocks") and hasattr(visual, "merger"):
        kind = "qwen2_5_vl" if hasattr(visual, "fullatt_block_indexes") else "qwen2_vl"
        return EncoderSpec(kind=kind, layout="packed", tower=visual, blocks=visual.blocks, output=visual.merger,
                           config=visual.config, depth=len(visual.blocks), group=int(visual.spatial_merge_size) ** 2,
                           zip_refusal=_NO_CLS)
    return None


def _next_crops(model: nn.Module) -> Callable[[dict], list[int] | None]:
    """LLaVA-NeXT: how many crops (base + tiles) each image of a ``get_image_features`` call has."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config

    def crops(kwargs: dict) -> list[int] | None:
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            return None
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size) for s in sizes]

    return crops


def _token_id(config: Any, kind: str) -> int | None:
    for name in (f"{kind}_token_id", f"{kind}_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None
