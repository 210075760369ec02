"""Model families and the plugin's lmms-eval models, declared once: which checkpoints and classes each
family takes, which lmms-eval model serves it, and which preset table it uses; each lmms-eval model's chat
and simple classes and aliases (the entry-point manifest is built from this table). Light on purpose (no
torch): sweep configs and model args check against it before anything loads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "FAMILY_NAMES", "PRESET_SHAPES", "LmmsModel", "LMMS_MODELS", "get_family",
           "preset_family", "family_for_class", "family_of_class", "lmms_siblings", "is_plugin_model",
           "ENCODER_DROP_TYPES", "VISIONZIP_TYPES"]


@dataclass(frozen=True)
class LmmsModel:
    """An lmms-eval model the plugin registers: its chat and simple classes (import paths under
    ``v2drop_eval.plugin``; None where lmms-eval 0.7.3 has no such parent class) and its aliases."""

    id: str
    chat: str | None
    simple: str | None
    aliases: tuple[str, ...] = ()


# A class exists wherever lmms-eval 0.7.3 has one for the parent (chat: llava_hf, qwen2_5_vl, qwen3_vl,
# internvl_hf; simple: all but internvl_hf).
LMMS_MODELS: dict[str, LmmsModel] = {m.id: m for m in (
    LmmsModel("v2drop_llava", "llava.V2DropLlavaChat", "llava.V2DropLlava", ("v2drop_llava_hf",)),
    LmmsModel("v2drop_qwen2_vl", None, "qwen2_vl.V2DropQwen2VL"),
    LmmsModel("v2drop_qwen2_5_vl", "qwen2_vl.V2DropQwen2_5_VLChat", "qwen2_vl.V2DropQwen2_5_VL"),
    LmmsModel("v2drop_qwen3_vl", "qwen3_vl.V2DropQwen3VLChat", "qwen3_vl.V2DropQwen3VL"),
    LmmsModel("v2drop_internvl", "internvl.V2DropInternVL", None, ("v2drop_internvl_hf",)),
)}


def is_plugin_model(name: str) -> bool:
    """``name`` is one of the plugin's lmms-eval models or aliases (they always write a side-car)."""
    return any(name == m.id or name in m.aliases for m in LMMS_MODELS.values())


@dataclass(frozen=True)
class Family:
    name: str
    lmms_model: str  # the plugin's lmms-eval model (a key of LMMS_MODELS)
    model_types: tuple[str, ...]  # config.model_type values of checkpoints it takes
    classes: tuple[str, ...]  # transformers classes the engine's adapter supports
    presets: str  # preset table: presets were matched on this family's published shape (or derived for its depth)
    aliases: tuple[str, ...] = ()  # other names accepted in sweep configs and DropSchedule.preset
    adapter: str = ""  # how adapters.py reads the model (``llava`` or ``qwen2_vl``); "" = the preset table's name
    deepstack: bool = False  # the decoder adds vision features after its first layers (Qwen3-VL's DeepStack)
    mrope: bool = False  # M-RoPE: three position numbers per token (the Qwen-VLs), not one

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
    Family("qwen2_vl", "v2drop_qwen2_vl", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), "qwen2_vl",
           mrope=True),
    Family("qwen2_5_vl", "v2drop_qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",), "qwen2_vl",
           mrope=True),
    # InternVL3-8B's decoder is 28 layers deep like Qwen2-VL-7B's: the derivation gives the same table
    # (docs/methods.md, "InternVL presets").
    Family("internvl", "v2drop_internvl", ("internvl",), ("InternVLForConditionalGeneration",), "qwen2_vl",
           ("internvl_hf",)),
    Family("qwen3_vl", "v2drop_qwen3_vl", ("qwen3_vl", "qwen3_vl_moe"),
           ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"), "qwen3_vl", deepstack=True,
           mrope=True),
)}
if unknown := {f.lmms_model for f in FAMILIES.values()} - set(LMMS_MODELS):
    raise RuntimeError(f"families name lmms-eval models that LMMS_MODELS does not declare: {sorted(unknown)}")
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


def family_for_class(class_name: str) -> Family:
    """The family that takes transformers class ``class_name``; TypeError naming the supported classes."""
    for fam in FAMILIES.values():
        if class_name in fam.classes:
            return fam
    supported = [c for f in FAMILIES.values() for c in f.classes]
    raise TypeError(f"{class_name} is not supported; supported model classes: {', '.join(supported)}")


def family_of_class(class_name: str) -> str:
    """The adapter family (``llava``, ``qwen2_vl``, ``qwen3_vl``) that reads transformers class ``class_name``
    (Qwen2.5-VL through the qwen2_vl adapter, LLaVA-OneVision the llava one); TypeError if none."""
    return family_for_class(class_name).adapter_family
