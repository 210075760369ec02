"""Model families, declared once: which checkpoints and classes each takes, its lmms-eval model name,
and which preset table it uses. Light on purpose (no torch): sweep configs and model args check
against it before anything loads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "FAMILY_NAMES", "PRESET_SHAPES", "get_family", "preset_family", "family_of_class",
           "lmms_siblings", "ENCODER_DROP_TYPES", "VISIONZIP_TYPES"]


@dataclass(frozen=True)
class Family:
    name: str
    lmms_model: str  # the plugin's lmms-eval model name
    model_types: tuple[str, ...]  # config.model_type values of checkpoints it takes
    classes: tuple[str, ...]  # transformers classes the engine's adapter supports
    presets: str  # preset table: presets were matched on this family's published shape (or derived for its depth)
    aliases: tuple[str, ...] = ()  # other names accepted in sweep configs and DropSchedule.preset
    adapter: str = ""  # how adapters.py reads the model (``llava`` or ``qwen2_vl``); "" = the preset table's name

    @property
    def adapter_family(self) -> str:
        return self.adapter or self.presets


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llava", "v2drop_llava", ("llava", "llava_next"),
           ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
            "LlavaNextVideoForConditionalGeneration"), "llava", ("llava_hf",)),
    # LLaVA-OneVision-7B's decoder is Qwen2-7B, 28 layers like Qwen2-VL-7B: the Qwen2-VL derivation gives
    # the same table (docs/methods.md, "Presets per family"). Loaded by the same lmms-eval class.
    Family("llava_onevision", "v2drop_llava", ("llava_onevision",), ("LlavaOnevisionForConditionalGeneration",),
           "qwen2_vl", adapter="llava"),
    Family("qwen2_vl", "v2drop_qwen2_vl", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), "qwen2_vl"),
    Family("qwen2_5_vl", "v2drop_qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",), "qwen2_vl"),
    # InternVL3-8B's decoder is 28 layers deep like Qwen2-VL-7B's: the derivation gives the same table
    # (docs/methods.md, "InternVL presets").
    Family("internvl", "v2drop_internvl", ("internvl",), ("InternVLForConditionalGeneration",), "qwen2_vl",
           ("internvl_hf",)),
    Family("qwen3_vl", "v2drop_qwen3_vl", ("qwen3_vl", "qwen3_vl_moe"),
           ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"), "qwen3_vl"),
)}
# Dropping before the LLM, by checkpoint type (config.model_type): which take encoder_schedule= (CLIP-ViT of
# LLaVA-1.5 / NeXT, the Qwen2-VL / Qwen2.5-VL ViT) and method=visionzip (LLaVA-1.5's CLIP [CLS]). A loaded
# model's reasons for the others: adapters.encoder_for.
ENCODER_DROP_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
VISIONZIP_TYPES = ("llava",)
# Every name a config may give (aliases included) -> its family.
_BY_NAME = {n: f for f in FAMILIES.values() for n in (f.name, *f.aliases)}
FAMILY_NAMES = tuple(sorted(_BY_NAME))
# The shapes presets were matched on: (vision tokens, decoder layers) of LLaVA-1.5-7B, Qwen2-VL-7B and
# Qwen3-VL-8B (36 layers; the Qwen counts are nominal: their images have any number of tokens).
PRESET_SHAPES = {"llava": (576, 32), "qwen2_vl": (576, 28), "qwen3_vl": (576, 36)}


def get_family(name: str) -> Family:
    """The family named ``name`` (or one of its aliases); ValueError naming the known ones."""
    if str(name) not in _BY_NAME:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILY_NAMES)}")
    return _BY_NAME[str(name)]


def lmms_siblings(name: str) -> tuple[Family, ...]:
    """The families served by the same lmms-eval model as family ``name`` (``v2drop_llava``: llava and
    llava_onevision); the checkpoint's ``model_type`` says which one a run is."""
    lmms_model = get_family(name).lmms_model
    return tuple(f for f in FAMILIES.values() if f.lmms_model == lmms_model)


def preset_family(name: str) -> str:
    """The preset table of family ``name`` (``llava``, ``qwen2_vl``, ``qwen3_vl``)."""
    return get_family(name).presets


def family_of_class(class_name: str) -> str:
    """The adapter family (``llava`` or ``qwen2_vl``) that handles transformers class ``class_name``;
    TypeError if none."""
    for fam in FAMILIES.values():
        if class_name in fam.classes:
            return fam.adapter_family  # Qwen2.5-VL runs through the qwen2_vl adapter, LLaVA-OneVision the llava one
    supported = [c for f in FAMILIES.values() for c in f.classes]
    raise TypeError(f"{class_name} is not supported; supported model classes: {', '.join(supported)}")
