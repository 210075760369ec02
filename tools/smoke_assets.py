"""Tiny offline assets for end-to-end checks of the lmms-eval plugin: saved models, tasks, data.

``build_tiny_assets(root)`` writes, with no network access:

- ``root/llava``: a random-weight ``LlavaForConditionalGeneration`` (CLIP tower 32x32 px, patch 8,
  16 vision tokens per image; Llama decoder hidden 64, 4 layers) with a byte-level BPE tokenizer
  trained on the spot with ``tokenizers``, a ``LlavaProcessor`` and the llava-hf 1.5 chat template;
- ``root/qwen2_vl``: a random-weight ``Qwen2VLForConditionalGeneration`` (patch 4, merge 2, so a
  56x56 px image gives 49 vision tokens; decoder hidden 64, 4 layers) with its processor and the
  Qwen2-VL-Instruct chat template;
- ``root/qwen2_5_vl``: the same for ``Qwen2_5_VLForConditionalGeneration``;
- ``root/internvl``: a random-weight ``InternVLForConditionalGeneration`` (64x64 px tiles, patch 8, pixel
  shuffle 0.5, so 16 vision tokens per tile; an image is cut into tiles plus a thumbnail, so images of
  other shapes carry other counts; video frames are one tile each; Qwen2 decoder hidden 64, 4 layers)
  with its processor (tiles, video frames) and the InternVL3-hf chat template;
- ``root/qwen3_vl``: a random-weight ``Qwen3VLForConditionalGeneration`` (patch 16, merge 2, as
  lmms-eval's Qwen3-VL classes resize for; DeepStack after decoder layers 0 and 1; decoder hidden 64,
  4 layers) with its processor;
- ``root/llava_onevision``: a random-weight ``LlavaOnevisionForConditionalGeneration`` (SigLIP-like tower
  32x32 px tiles, patch 8: 16 tokens per tile, any-resolution tiling up to 3x3 tiles, 4 tokens per video
  frame; Qwen2 decoder hidden 64, 4 layers) with its processor (images and videos) and chat template;
- ``root/tasks``: a folder for lmms-eval's ``--include_path`` with ``tiny_textvqa`` and ``tiny_mme``,
  parquet data beside their YAMLs, reusing the official TextVQA and MME prompt and metric functions
  (``!function lmms_eval.tasks.<task>.utils...``). MME keeps its yes/no question pairs intact.
  Also ``tiny_video``: short mp4 clips written with PyAV (a coloured square moving over a plain
  background, 64x48 to 96x64 px, 8 to 16 frames, about 1.5 KB each) and two still images among them, so
  that one batch mixes videos and images; MVBench's official prompt and metric; the clips are read by
  the model class's own video loader (lmms-eval ``llava_hf``: decord).

Images have different sizes, so Qwen rows carry different numbers of vision tokens.
Used by ``tests/`` and by the sweep's smoke config; everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_assets", "TINY_TASKS", "VIDEO_TASKS", "NUM_LAYERS"]

NUM_LAYERS = 4
TINY_TASKS = ("tiny_textvqa", "tiny_mme")
VIDEO_TASKS = ("tiny_video",)
_SEED = 1234

# llava-hf/llava-1.5-*-hf processor chat template (images first, then text, "ASSISTANT:" prompt),
# plus plain-string contents: transformers 5 gives the tokenizer this template too (chat_template.jinja),
# and lmms-eval's simple llava_hf applies it to string messages ("<image>\nquestion").
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct chat template.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# OpenGVLab/InternVL3-*-hf chat template (its default system prompt left out): an image is "<IMG_CONTEXT>\n",
# a video "<video>\n"; the processor expands both into <img>...</img> runs of image tokens.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_TILE, INTERNVL_TOKENS_PER_TILE = 64, 16
# llava-hf/llava-onevision-qwen2-*-ov-hf chat template (images, then videos, then text, Qwen turns), plus
# plain-string contents for lmms-eval's simple llava_hf ("<video>\nquestion").
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# (question, answers) for tiny_textvqa; (category, [(question, answer), (question, answer)]) for tiny_mme.
TEXTVQA_DOCS = [
    ("what is written on the sign?", ["stop"] * 7 + ["stop sign"] * 3),
    ("what brand is the bottle?", ["coke"] * 10),
    ("what number is on the shirt?", ["23"] * 8 + ["32"] * 2),
    ("what color is the car?", ["red"] * 10),
]
MME_DOCS = [
    ("existence", [("Is there a dog in this image? Please answer yes or no.", "Yes"),
                   ("Is there a cat in this image? Please answer yes or no.", "No")]),
    ("color", [("Is the car in the image red? Please answer yes or no.", "Yes"),
               ("Is the car in the image blue? Please answer yes or no.", "No")]),
    ("commonsense_reasoning", [("Should I stop here? Please answer yes or no.", "Yes"),
                               ("Should I drive on here? Please answer yes or no.", "No")]),
]
# tiny_video: (question, candidates, answer, clip) with clip = (frames, width, height, square colour) or
# an image size (w, h) for the two still images among the clips. Widths are multiples of 32 (decord).
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
VIDEO_DOCS = [
    ("What color is the moving square?", ["red", "blue", "green"], "red", (8, 64, 48, "red")),
    ("What color is the moving square?", ["green", "yellow", "red"], "green", (12, 96, 64, "green")),
    ("What color is the moving square?", ["blue", "red", "yellow"], "blue", (16, 64, 64, "blue")),
    ("Which way does the square move?", ["left to right", "right to left"], "left to right", (10, 64, 48, "yellow")),
    ("What color is the moving square?", ["yellow", "green", "blue"], "yellow", (8, 96, 64, "yellow")),
    ("How many squares are there?", ["one", "two", "three"], "one", (9, 64, 48, "red")),
    ("What color is the shape?", ["red", "blue"], "red", (56, 84)),
    ("Is there a circle?", ["yes", "no"], "yes", (84, 56)),
]

VIDEO_YAML = """\
task: tiny_video
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: tiny_video.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_video_utils.doc_to_visual
doc_to_text: !function lmms_eval.tasks.mvbench.utils.mvbench_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function lmms_eval.tasks.mvbench.utils.mvbench_process_results
metric_list:
  - metric: mvbench_accuracy
    aggregation: !function lmms_eval.tasks.mvbench.utils.mvbench_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    post_prompt: "Answer with the option's letter from the given choices directly."
metadata:
  - version: 0.0
"""

# The task's one local function: the clip's path beside the YAML (lmms-eval's video tasks hand the model a
# path), or the still image.
VIDEO_UTILS = '''"""tiny_video: the clip's path (clips live beside this file), or the document's still image."""
import os


def doc_to_visual(doc):
    if doc.get("video"):
        return [os.path.join(os.path.dirname(os.path.abspath(__file__)), doc["video"])]
    return [doc["image"].convert("RGB")]
'''

# Image sizes (w, h), multiples of 28 so qwen_vl_utils keeps them; LLaVA resizes them all to 32x32.
IMAGE_SIZES = [(56, 56), (84, 56), (56, 84), (112, 56)]

TEXTVQA_YAML = """\
task: tiny_textvqa
dataset_path: parquet
dataset_kwargs:
  data_files:
    validation: tiny_textvqa.parquet
test_split: validation
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.textvqa.utils.textvqa_doc_to_visual
doc_to_text: !function lmms_eval.tasks.textvqa.utils.textvqa_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  until:
    - "ASSISTANT:"
  max_new_tokens: 6
process_results: !function lmms_eval.tasks.textvqa.utils.textvqa_process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
    ocr: false
metadata:
  - version: 0.0
"""

MME_YAML = """\
task: tiny_mme
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: tiny_mme.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.mme.utils.mme_doc_to_visual
doc_to_text: !function lmms_eval.tasks.mme.utils.mme_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function lmms_eval.tasks.mme.utils.mme_process_results
metric_list:
  - metric: mme_perception_score
    aggregation: !function lmms_eval.tasks.mme.utils.mme_aggregate_results
    higher_is_better: true
  - metric: mme_cognition_score
    aggregation: !function lmms_eval.tasks.mme.utils.mme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  - version: 0.0
"""


def _corpus() -> list[str]:
    """Text the tokenizers are trained on: the task prompts, answers and chat-template words."""
    lines = [q for q, _ in TEXTVQA_DOCS] + [a for _, ans in TEXTVQA_DOCS for a in ans]
    lines += [q for _, pair in MME_DOCS for q, _ in pair] + ["Yes", "No", "yes", "no"]
    lines += [f"Question:{q}\nOption:\n(A) {' (B) '.join(c)}" for q, c, _, _ in VIDEO_DOCS]
    lines += ["Answer with the option's letter from the given choices directly.", "A B C"]
    lines += ["Answer the question using a single word or phrase.", "USER: ASSISTANT:", "system user assistant",
              "You are a helpful assistant.", "A chat between a curious user and an artificial intelligence "
              "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."]
    return lines * 4


def _train_tokenizer(specials: list[str], vocab_size: int, bos: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if bos is not None:
        # Llama-style: every encoded text starts with BOS.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _fast_tokenizer(tok: Any, **specials: Any):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _round_up(n: int, k: int = 8) -> int:
    return (n + k - 1) // k * k


def build_llava(out: Path) -> Path:
    """A tiny LLaVA-1.5-like checkpoint with tokenizer, processor and chat template in ``out``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _fast_tokenizer(_train_tokenizer(LLAVA_SPECIALS, 400, bos="<s>"), bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>", pad_token="<pad>", padding_side="left")
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(_SEED)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=_round_up(len(tok)),
                                max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=image_id, vision_feature_layer=-1, vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(cfg).float().eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         do_center_crop=True, do_resize=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def build_qwen(out: Path, variant: str = "qwen2_vl") -> Path:
    """A tiny Qwen2-VL (``variant="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) checkpoint in ``out``."""
    import torch
    from transformers import Qwen2VLImageProcessor

    tok = _fast_tokenizer(_train_tokenizer(QWEN_SPECIALS, 400, bos=None), eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", padding_side="left")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=_round_up(len(tok)), max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    torch.manual_seed(_SEED + 1)
    if variant == "qwen2_vl":
        from transformers import (
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
        )

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **common))
        proc_cls, video_cls = Qwen2VLProcessor, Qwen2VLVideoProcessor
    elif variant == "qwen2_5_vl":
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLVideoProcessor,
        )

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                      window_size=16, fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common))
        proc_cls, video_cls = Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
    else:
        raise ValueError(f"unknown variant {variant!r}; allowed: qwen2_vl, qwen2_5_vl")
    model = model.float().eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out)
    pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=128 * 128)
    image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = video_cls(**pixels)
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def build_internvl(out: Path) -> Path:
    """A tiny InternVL3-like checkpoint (Qwen2 decoder) with tokenizer, processor and chat template in ``out``."""
    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    # The processor finds its marker tokens by these tokenizer attributes, as in InternVL3-*-hf.
    markers = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"}
    tok = _fast_tokenizer(_train_tokenizer(INTERNVL_SPECIALS, 400, bos=None), eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", padding_side="left", extra_special_tokens=markers)
    torch.manual_seed(_SEED + 2)
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=INTERNVL_TILE, patch_size=8),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=_round_up(len(tok)),
                         max_position_embeddings=2048, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=INTERNVL_TOKENS_PER_TILE,
    )
    model = InternVLForConditionalGeneration(cfg).float().eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    size = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=12),
        tokenizer=tok, video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=INTERNVL_TOKENS_PER_TILE, chat_template=INTERNVL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def build_qwen3_vl(out: Path) -> Path:
    """A tiny Qwen3-VL checkpoint in ``out``. lmms-eval's Qwen3-VL classes size images for patch 16 and
    merge 2 (``process_vision_info(image_patch_size=16)``, then ``do_resize=False``), so the tiny tower
    keeps those: a 64x64 px image gives 4 vision tokens."""
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok = _fast_tokenizer(_train_tokenizer(QWEN_SPECIALS, 400, bos=None), eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", padding_side="left")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=_round_up(len(tok)), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    torch.manual_seed(_SEED + 2)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None)).float().eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out)
    pixels = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(**pixels, min_pixels=32 * 32, max_pixels=256 * 256)
    video_processor = Qwen3VLVideoProcessor(**pixels, size={"shortest_edge": 32 * 32, "longest_edge": 256 * 256})
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def build_llava_onevision(out: Path) -> Path:
    """A tiny LLaVA-OneVision checkpoint (images with any-resolution tiles, and videos) in ``out``."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = _fast_tokenizer(_train_tokenizer(ONEVISION_SPECIALS, 400, bos=None), eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", padding_side="left")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ONEVISION_SPECIALS}
    tile, pinpoints = 32, [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96]]
    torch.manual_seed(_SEED + 2)
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=tile, patch_size=8),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=_round_up(len(tok)),
                         max_position_embeddings=4096, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(cfg).float().eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile}),
        tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def write_clip(path: Path, frames: int, width: int, height: int, colour: tuple[int, int, int]) -> Path:
    """An mp4 (MPEG-4 part 2, PyAV) of a square moving left to right over a grey background."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        side = height // 3
        for i in range(frames):
            frame = np.full((height, width, 3), 128, dtype=np.uint8)
            x = (width - side) * i // max(frames - 1, 1)
            frame[side:2 * side, x:x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build_video_task(out: Path) -> Path:
    """``tiny_video`` (YAML, utils, parquet, mp4 clips) in ``out``, for ``--include_path out``."""
    from datasets import Dataset, Features, Image, Sequence, Value

    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[Any]] = {"question_id": [], "question": [], "candidates": [], "answer": [], "video": [],
                                  "image": []}
    for i, (question, candidates, answer, clip) in enumerate(VIDEO_DOCS):
        video, image = None, None
        if len(clip) == 4:
            frames, width, height, colour = clip
            video = f"tiny_video_{i}.mp4"
            write_clip(out / video, frames, width, height, COLOURS[colour])
        else:
            image = _image(20 + i, clip)
        for key, value in (("question_id", i), ("question", question), ("candidates", candidates),
                           ("answer", answer), ("video", video), ("image", image)):
            rows[key].append(value)
    Dataset.from_dict(rows, features=Features({
        "question_id": Value("int64"), "question": Value("string"), "candidates": Sequence(Value("string")),
        "answer": Value("string"), "video": Value("string"), "image": Image()})).to_parquet(str(out / "tiny_video.parquet"))
    (out / "tiny_video.yaml").write_text(VIDEO_YAML)
    (out / "tiny_video_utils.py").write_text(VIDEO_UTILS)
    return out


def _image(i: int, size: tuple[int, int]):
    """A deterministic picture: coloured rectangles on a plain background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (20 * i % 255, 80, 160))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle([w // 8, h // 6, w // 2, h // 2], fill=(230, 30 + 40 * i % 200, 30))
    draw.ellipse([w // 2, h // 2, w - 4, h - 4], fill=(30, 200, 60 + 50 * i % 190))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def build_tasks(out: Path) -> Path:
    """``tiny_textvqa`` and ``tiny_mme`` (YAML + parquet) in ``out``, for ``--include_path out``."""
    from datasets import Dataset, Features, Image, Sequence, Value

    out.mkdir(parents=True, exist_ok=True)
    textvqa = {
        "question_id": [i for i in range(len(TEXTVQA_DOCS))],
        "question": [q for q, _ in TEXTVQA_DOCS],
        "answers": [a for _, a in TEXTVQA_DOCS],
        "ocr_tokens": [["stop", "coke", "23", "red"]] * len(TEXTVQA_DOCS),
        "image": [_image(i, IMAGE_SIZES[i % len(IMAGE_SIZES)]) for i in range(len(TEXTVQA_DOCS))],
    }
    Dataset.from_dict(textvqa, features=Features({
        "question_id": Value("int64"), "question": Value("string"), "answers": Sequence(Value("string")),
        "ocr_tokens": Sequence(Value("string")), "image": Image()})).to_parquet(str(out / "tiny_textvqa.parquet"))
    mme: dict[str, list[Any]] = {"question_id": [], "question": [], "answer": [], "category": [], "image": []}
    for i, (category, pair) in enumerate(MME_DOCS):
        image = _image(10 + i, IMAGE_SIZES[(i + 1) % len(IMAGE_SIZES)])
        for question, answer in pair:  # a pair shares its image and question_id, as in MME
            mme["question_id"].append(f"{category}/{i}.png")
            mme["question"].append(question)
            mme["answer"].append(answer)
            mme["category"].append(category)
            mme["image"].append(image)
    Dataset.from_dict(mme, features=Features({
        "question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
        "category": Value("string"), "image": Image()})).to_parquet(str(out / "tiny_mme.parquet"))
    (out / "tiny_textvqa.yaml").write_text(TEXTVQA_YAML)
    (out / "tiny_mme.yaml").write_text(MME_YAML)
    return out


def build_tiny_assets(root: Path | str, qwen2_5: bool = True) -> dict[str, Any]:
    """Build every tiny asset under ``root`` (skipping parts already built) and describe them.

    Returns ``{"root": Path, "llava": Path, "qwen2_vl": Path, "qwen2_5_vl": Path | None, "qwen3_vl": Path, "internvl": Path,
    "llava_onevision": Path, "include_path": Path, "tasks": ["tiny_textvqa", "tiny_mme"], "video_tasks": ["tiny_video"],
    "num_layers": 4, "docs": {task: count}}``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = root / "assets.json"
    info: dict[str, Any] = {
        "root": root, "llava": root / "llava", "qwen2_vl": root / "qwen2_vl",
        "qwen2_5_vl": root / "qwen2_5_vl" if qwen2_5 else None, "qwen3_vl": root / "qwen3_vl",
        "internvl": root / "internvl", "llava_onevision": root / "llava_onevision",
        "include_path": root / "tasks", "tasks": list(TINY_TASKS), "video_tasks": list(VIDEO_TASKS),
        "num_layers": NUM_LAYERS,
        "docs": {"tiny_textvqa": len(TEXTVQA_DOCS), "tiny_mme": 2 * len(MME_DOCS), "tiny_video": len(VIDEO_DOCS)},
    }
    built = json.loads(done.read_text()) if done.is_file() else {}
    steps = {"llava": lambda: build_llava(info["llava"]), "qwen2_vl": lambda: build_qwen(info["qwen2_vl"]),
             "qwen3_vl": lambda: build_qwen3_vl(info["qwen3_vl"]), "internvl": lambda: build_internvl(info["internvl"]),
             "tasks": lambda: build_tasks(info["include_path"]),
             "llava_onevision": lambda: build_llava_onevision(info["llava_onevision"]),
             "video_tasks": lambda: build_video_task(info["include_path"])}
    if qwen2_5:
        steps["qwen2_5_vl"] = lambda: build_qwen(info["qwen2_5_vl"], "qwen2_5_vl")
    for name, step in steps.items():
        if not built.get(name):
            step()
            built[name] = True
            done.write_text(json.dumps(built))
    return info
