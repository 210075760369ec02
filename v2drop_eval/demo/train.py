"""Train the demo's tiny LLaVA / Qwen2-VL models from scratch on the synthetic benchmark, on a CPU.

    python -m v2drop_eval.demo.train --family llava --out v2drop_eval/demo/models/llava [--minutes 50]

The models have the real architectures (``LlavaForConditionalGeneration``: CLIP tower + Llama decoder;
``Qwen2VLForConditionalGeneration``), each with a word-level tokenizer trained offline, its processor
and chat template, saved with ``save_pretrained`` so they load through ``pretrained=<dir>`` like any
hub model. What makes them learn in under an hour on one CPU thread each (a first attempt, with
8-pixel patches and none of the below, reached 76% after 35 minutes):

- one object per vision token: 28-pixel cells on a 224-pixel image, LLaVA patch 28, Qwen patch 14
  merged 2x2 (``data.py``);
- auxiliary losses on the image features (training only, the heads are not saved): linear probes
  predict each cell's colour and shape, and object features are pulled towards the decoder's own
  embeddings of their colour and shape words; objects and background weigh the same (with a plain
  mean over the 64 cells the tower learnt "background" and little else);
- attention pointers (training only): at decoder layer ``--pointer-layer`` (3), head 0 / 1 / 2 is
  taught to look, from the position that predicts the answer, at the answer's image token for colour /
  shape / yes-no questions and at position 0 otherwise, and the answer is read out right after that
  layer (final norm + LM head). The lookup is what a model trained from scratch on a CPU otherwise
  takes very long to find (a first run without it stayed at chance for 700 steps);
- ``--gather-layer`` (the Qwen2-VL recipe uses 1): head 0 of that layer is also taught to look, from
  the same position, at the question's words that name the object ("triangle"; "blue circle"), the
  first hop of the lookup. Without it the Qwen2-VL model learnt a shortcut instead: at layer 0 the
  answer position read the sum of all image tokens (right for one object, a trap for five) and
  spent thousands of steps at the two-object level of the curriculum;
- ``--freeze-vision``: after phase 1 only the projector / merger of the vision side trains (Qwen2-VL's
  tower sees 256 patches per image; the step is 30% faster without its backward pass);
- a curriculum from one object per image up to five;
- ``--init-from DIR`` (not used by the shipped recipe): start the decoder from another trained demo
  model's, the way real VLMs start from a pre-trained LLM. From the LLaVA model's decoder the Qwen2-VL
  model reached 0.81 validation accuracy in 800 steps;
- the loss on the answer and end-of-turn tokens only; one question per image (extra question turns
  about the same image let later turns copy answers from earlier questions instead of looking).

Nothing of this changes the saved model's architecture: it is a stock transformers checkpoint, and
dropping a token the pointer needs (at or before layer 3) costs accuracy, which is what the demo
measures.

Training stops when validation accuracy (its own split, never the test split) reaches ``--target`` or
the time runs out; the test split is scored once at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from v2drop_eval.demo.data import (
    ANSWERS,
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    POST_PROMPT,
    SHAPES,
    TEST_SEED,
    TEST_SIZE,
    Item,
    extra_questions,
    make_item,
    make_split,
    prompt_text,
)

__all__ = ["build_tokenizer", "build_processor", "build_model", "score_items", "train", "main"]

FAMILIES = ("llava", "qwen2_vl")
VISION_TOKENS = GRID * GRID  # 64 per image in both families
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# The chat templates accept a string content (lmms-eval's simple classes) or a list of typed parts (its
# chat classes and transformers' processors). They drop system turns: the models never saw one, and
# harnesses add their own (lmms-eval's qwen2_vl sends "You are a helpful assistant.").
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


# -- tokenizer, processor, model --------------------------------------------------------------------
def _words() -> list[str]:
    """Every word the prompts, templates and answers use (lower case, as the normaliser makes them)."""
    import re

    text = " ".join(
        [
            "what color is the object shape is there a user assistant system",
            POST_PROMPT,
            " ".join(ANSWERS),
            "you are a helpful assistant .",  # lmms-eval's default system prompt, if a template keeps it
        ]
    ).lower()
    return sorted(set(re.findall(r"\w+|[^\w\s]+", text)) | {"?", ".", ":"})


def build_tokenizer(family: str) -> Any:
    """A word-level tokenizer (``tokenizers``, no download) wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = [PAD, UNK, BOS, EOS] + (["<image>"] if family == "llava" else QWEN_SPECIAL)
    vocab = {tok: i for i, tok in enumerate(special + _words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "llava":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
            additional_special_tokens=["<image>"], padding_side="left",
        )
        fast.image_token = "<image>"
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<|endoftext|>", unk_token=UNK, bos_token=None,
            eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIAL, padding_side="left",
        )
    fast.chat_template = LLAVA_TEMPLATE if family == "llava" else QWEN_TEMPLATE
    return fast


def build_processor(family: str) -> Any:
    """The family's processor, sized so that every 224x224 image gives exactly 64 vision tokens."""
    tokenizer = build_tokenizer(family)
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=CELL,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE, image_token="<image>",
        )
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # min = max pixels: the image is never rescaled away from the 28-pixel cell grid.
    image_processor = Qwen2VLImageProcessor(
        min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
        patch_size=CELL // 2, merge_size=2, temporal_patch_size=2,
    )
    # The processor class requires a video processor; the demo never feeds video.
    video_processor = Qwen2VLVideoProcessor(patch_size=CELL // 2, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN_TEMPLATE,
    )


def build_model(family: str, tokenizer: Any, layers: int = 8, hidden: int = 128, seed: int = 0,
                rope_theta: float = 1e6) -> nn.Module:
    """A tiny model of the real class, random weights; ``layers`` decoder layers of width ``hidden``.

    ``rope_theta`` 1e6 (Qwen2-VL's own value): with head size 32 and the default 1e4 only a few rotary
    frequencies turn slowly enough over the ~80 positions between the question and the image for a
    head to match "the triangle" against image tokens by content; training stalled at two objects."""
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    text = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    if family == "llava":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=CELL, projection_dim=96,
            ),
            text_config=LlamaConfig(**text),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=True,
        )
        model = LlavaForConditionalGeneration(cfg)
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
        head_dim = hidden // 4
        cfg = Qwen2VLConfig(
            text_config=dict(
                rope_parameters={
                    "rope_type": "default", "rope_theta": rope_theta,
                    # temporal / height / width rotary sections; they sum to head_dim / 2
                    "mrope_section": [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6],
                },
                **text,
            ),
            vision_config=dict(
                depth=2, embed_dim=96, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=CELL // 2,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            ),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
            tie_word_embeddings=True,
        )
        model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 4
    model.generation_config.do_sample = False
    return model.float()


# Tokens with no namesake in the other family's vocabulary that play the same part in its chat template.
_TOKEN_ALIASES = {"<|im_start|>": BOS, "<|im_end|>": EOS, "<|image_pad|>": "<image>", "<|endoftext|>": PAD,
                  BOS: "<|im_start|>", EOS: "<|im_end|>", "<image>": "<|image_pad|>"}


def init_decoder_from(model: nn.Module, tokenizer: Any, source: str | Path) -> dict:
    """Start ``model``'s language decoder from a trained demo model's (either family): every decoder
    weight of the same name and shape, and the word embeddings row by row by token string (chat-template
    tokens through ``_TOKEN_ALIASES``). Real VLMs start from a pre-trained LLM in the same way (LLaVA
    from Vicuna, Qwen2-VL from Qwen2). Returns counts of what was copied."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    src = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    src_tok = AutoTokenizer.from_pretrained(source)
    src_sd = src.model.language_model.state_dict()
    dst = model.model.language_model
    copied = 0
    with torch.no_grad():
        for name, tensor in dst.state_dict().items():
            if name != "embed_tokens.weight" and name in src_sd and src_sd[name].shape == tensor.shape:
                tensor.copy_(src_sd[name])
                copied += 1
        src_vocab, rows = src_tok.get_vocab(), 0
        embed, src_embed = dst.embed_tokens.weight, src_sd["embed_tokens.weight"]
        for token, i in tokenizer.get_vocab().items():
            j = src_vocab.get(token, src_vocab.get(_TOKEN_ALIASES.get(token, "")))
            if j is not None:
                embed[i] = src_embed[j]
                rows += 1
    return {"init_from": str(source), "init_tensors": copied, "init_embedding_rows": rows}


def _vision_output_module(model: nn.Module, family: str) -> nn.Module:
    """The module whose output is the per-token image features fed to the decoder."""
    return model.model.multi_modal_projector if family == "llava" else model.model.visual.merger


def _vision_tower(model: nn.Module, family: str) -> nn.Module:
    """The whole vision side up to the decoder (Qwen2-VL's includes its merger, LLaVA's not its projector)."""
    return model.model.vision_tower if family == "llava" else model.model.visual


# -- batches ------------------------------------------------------------------------------------------
def chat_messages(item: Item, answer: bool, extra: list[tuple[str, str]] = ()) -> list[dict]:
    # The same shape lmms-eval's chat classes build: image part first, then the text. ``extra``
    # question / answer pairs about the same image follow as further turns (training only).
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text(item.question)}]}]
    if answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": item.answer}]})
        for q, a in extra:
            msgs.append({"role": "user", "content": [{"type": "text", "text": prompt_text(q)}]})
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


def _cell_labels(items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 64] colour and shape class per cell, 0 for background (else 1 + index)."""
    colors, shapes = list(COLORS), list(SHAPES)
    col = torch.zeros(len(items), VISION_TOKENS, dtype=torch.long)
    shp = torch.zeros(len(items), VISION_TOKENS, dtype=torch.long)
    for b, it in enumerate(items):
        for o in it.objects:
            col[b, o.row * GRID + o.col] = 1 + colors.index(o.color)
            shp[b, o.row * GRID + o.col] = 1 + shapes.index(o.shape)
    return col, shp


def question_target(item: Item, question: str) -> int:
    """The grid cell (row * GRID + col) that answers ``question`` about ``item``'s image, or -1 (a "no")."""
    named = {"color": lambda o: [o.shape], "shape": lambda o: [o.color], "exists": lambda o: [o.color, o.shape]}
    keys, attributes = question_keys(question), named[question_type(question)]
    hits = [o for o in item.objects if attributes(o) == keys]
    return hits[0].row * GRID + hits[0].col if len(hits) == 1 else -1


def question_keys(question: str) -> list[str]:
    """The question's words that name the object asked about: its shape (colour questions), its colour
    (shape questions), or both (yes/no: "is there a <colour> <shape>?")."""
    words = question.rstrip("?").split()
    qtype = question_type(question)
    return [words[-1]] if qtype == "color" else [words[-2]] if qtype == "shape" else words[-2:]


# The pointer heads of the pointer layer: one per question type. Each looks at the answer's image token
# for its own type of question and at position 0 (a sink that carries nothing) otherwise, so its
# output is already the answer's feature seen through a type-specific linear map.
POINTER_HEADS = {"color": 0, "shape": 1, "exists": 2}


def question_type(question: str) -> str:
    return "color" if question.startswith("what color") else "shape" if question.startswith("what shape") else "exists"


def _query_positions(ans: torch.Tensor, row: int) -> list[int]:
    """The positions that predict row ``row``'s answers (each one just before its answer token)."""
    return (ans[row].nonzero().flatten() - 1).tolist()


def _pointer_loss(attentions: tuple, layer: int, ids: torch.Tensor, ans: torch.Tensor, image_token_id: int,
                  targets: list[list[tuple[str, int]]]) -> torch.Tensor:
    """Mean -log attention of each pointer head at ``layer``, from the position that predicts each
    answer to the key it should read (the answer's image token, or the sink). Training only: it
    teaches the lookup, which a model trained from scratch on a CPU otherwise takes long to find."""
    attn = attentions[layer]  # [B, H, S, S]
    terms = []
    for b in range(ids.shape[0]):
        queries = _query_positions(ans, b)
        image_pos = (ids[b] == image_token_id).nonzero().flatten()
        for q, (qtype, cell) in zip(queries, targets[b], strict=False):
            for kind, head in POINTER_HEADS.items():
                key = int(image_pos[cell]) if kind == qtype and cell >= 0 else 0
                terms.append(-torch.log(attn[b, head, q, key] + 1e-6))
    return torch.stack(terms).mean() if terms else attn.sum() * 0.0


def _gather_loss(attentions: tuple, layer: int, head: int, ids: torch.Tensor, ans: torch.Tensor,
                 keys: list[list[list[int]]]) -> torch.Tensor:
    """Mean -log of the attention mass that ``head`` at ``layer`` puts, from the position that predicts
    each answer, on the question's key words (``question_keys``, as token ids; the last occurrence
    before the query). Training only: the first hop of the lookup, which brings "the triangle" to the
    answer position so that the pointer layer's query can match it against the image tokens."""
    attn = attentions[layer]  # [B, H, S, S]
    terms = []
    for b in range(ids.shape[0]):
        for q, key_ids in zip(_query_positions(ans, b), keys[b], strict=False):
            pos = [int((ids[b, :q] == k).nonzero().flatten()[-1]) for k in key_ids]
            terms.append(-torch.log(attn[b, head, q, pos].sum() + 1e-6))
    return torch.stack(terms).mean() if terms else attn.sum() * 0.0


def _readout_loss(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer read straight after the pointer layer (final norm + LM head on that
    layer's output at each answer's query position): a short gradient path to the pointer heads."""
    prev = torch.zeros_like(ans)
    prev[:, :-1] = ans[:, 1:]
    h = model.model.language_model.norm(hidden[prev])
    return F.cross_entropy(model.lm_head(h), ids[ans])


def encode(processor: Any, items: list[Item], answer: bool, extra: list[list[tuple[str, str]]] | None = None,
           ) -> tuple[dict, torch.Tensor]:
    """Right-padded model inputs (so positions match an unpadded run) and each row's last real index."""
    tok = processor.tokenizer
    extra = extra or [[] for _ in items]
    texts = [processor.apply_chat_template(chat_messages(it, answer, ex), tokenize=False, add_generation_prompt=not answer)
             for it, ex in zip(items, extra, strict=True)]
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        inputs = processor(text=texts, images=[it.image for it in items], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    last = inputs["attention_mask"].sum(1) - 1
    return dict(inputs), last


def answer_positions(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the positions of assistant answers (right after each generation prompt)."""
    tok = processor.tokenizer
    probe = processor.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    suffix = tok(probe, add_special_tokens=False)["input_ids"][-2:]  # e.g. ["assistant", ":"]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, 2:] = (input_ids[:, :-2] == suffix[0]) & (input_ids[:, 1:-1] == suffix[1])
    return mask


@torch.no_grad()
def score_items(model: nn.Module, processor: Any, items: list[Item], batch_size: int = 50) -> list[str]:
    """Greedy first answer token per item, in one forward pass each (the answers are single tokens)."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        inputs, last = encode(processor, chunk, answer=False)
        logits = model(**inputs).logits
        ids = logits[torch.arange(len(chunk)), last].argmax(-1)
        out += processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    return out


def accuracy(preds: list[str], items: list[Item]) -> float:
    return sum(p == it.answer for p, it in zip(preds, items, strict=True)) / max(1, len(items))


# -- training ----------------------------------------------------------------------------------------
class _AuxHeads(nn.Module):
    """Training-only probes on the image features: colour and shape of each cell, background = 0.

    Two separate heads (not one per colour-shape pair) push the features to carry colour and shape as
    separate directions, which is what the decoder has to match ("the triangle") and read ("red").
    """

    def __init__(self, hidden: int, embed: nn.Embedding | None = None, word_ids: torch.Tensor | None = None):
        super().__init__()
        self.color = nn.Linear(hidden, 1 + len(COLORS))
        self.shape = nn.Linear(hidden, 1 + len(SHAPES))
        # Grounding: pull each object token to the sum of the decoder's own embeddings of its colour and
        # shape words, and every background token to zero (what LLaVA's projector learns to do on
        # real data: image tokens in the word space). Then even the untrained decoder's near-uniform
        # attention over the image hands the object's words to the answer position, and "the triangle"
        # in the question finds its token by the dot product that matches words in text.
        self.embed = embed
        if word_ids is not None:
            self.register_buffer("word_ids", word_ids, persistent=False)  # [1 + colours + shapes]

    def loss(self, feat: torch.Tensor, items: list[Item]) -> torch.Tensor:
        col, shp = _cell_labels(items)
        feat = feat.reshape(len(items), VISION_TOKENS, -1)
        obj = col > 0
        # Objects and background weigh the same: 59 or more of the 64 cells are background, and a plain
        # mean over cells would teach "background" long before the colours and shapes.
        def balanced(per_cell: torch.Tensor) -> torch.Tensor:
            return per_cell[obj].mean() + per_cell[~obj].mean()

        ce = F.cross_entropy(self.color(feat).flatten(0, 1), col.flatten(), reduction="none") + F.cross_entropy(
            self.shape(feat).flatten(0, 1), shp.flatten(), reduction="none")
        loss = balanced(ce.view_as(col))
        if self.embed is not None:
            words = self.embed(self.word_ids).detach()  # [0]: unused, then colours, shapes
            n_col = len(COLORS)
            target = words[col] + words[n_col + shp]
            target = torch.where(obj[..., None], target, torch.zeros_like(target))
            # squared error relative to the typical squared norm of a word embedding
            scale = words[1:].pow(2).sum(-1).mean()
            loss = loss + balanced((feat - target).pow(2).sum(-1)) / scale
        return loss

    @torch.no_grad()
    def object_accuracy(self, feat: torch.Tensor, items: list[Item]) -> float:
        """Share of object cells whose colour and shape both come out right."""
        col, shp = _cell_labels(items)
        feat = feat.reshape(len(items), VISION_TOKENS, -1)
        ok = (self.color(feat).argmax(-1) == col) & (self.shape(feat).argmax(-1) == shp)
        return ok[col > 0].float().mean().item()


def _image_features(model: nn.Module, family: str, inputs: dict) -> None:
    """Run the vision tower and projector only (the forward hook captures their output)."""
    if family == "llava":
        model.model.get_image_features(
            pixel_values=inputs["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
    else:
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])


def _fast_patch_embed(model: nn.Module, family: str) -> None:
    """Training speed only: Qwen2-VL's patch embedding is a Conv3d whose kernel equals its stride, i.e.
    one matrix product per patch. On one CPU thread the convolution (forward and backward) took about
    150 ms of a 0.89 s step; as a linear product the step takes 0.80 s (with 2 threads no difference
    shows). Same weights, same result; the instance's ``forward`` is replaced, so the saved checkpoint
    is untouched."""
    if family != "qwen2_vl":
        return
    embed = model.model.visual.patch_embed

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = embed.proj.weight
        return F.linear(hidden_states.to(w.dtype).reshape(-1, w[0].numel()), w.reshape(w.shape[0], -1))

    embed.forward = forward


def freeze_vision_tower(model: nn.Module, family: str) -> int:
    """Freeze the vision tower after phase 1, all but its output module (LLaVA's projector, Qwen2-VL's
    merger), which keeps following the decoder's word embeddings as they train. Returns the number of
    frozen parameters. Training speed: no backward pass through the tower's 256 (Qwen2-VL) or 64
    (LLaVA) patch tokens per image."""
    out_params = {id(p) for p in _vision_output_module(model, family).parameters()}
    frozen = 0
    for p in _vision_tower(model, family).parameters():
        if id(p) not in out_params:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def pretrain_vision(model: nn.Module, family: str, processor: Any, aux_heads: _AuxHeads, captured: dict,
                    max_steps: int, lr: float, seed: int, batch_size: int = 32, target: float = 0.97) -> dict:
    """Phase 1: the vision tower and projector alone learn each cell's colour and shape (and, with
    grounding, to sit near the decoder's words for them), until ``target`` object accuracy (running
    mean) or ``max_steps``. Real LLaVA / Qwen2-VL start from a pre-trained vision encoder; this is
    the demo's stand-in, and it costs seconds: without it the joint phase spends most of its time
    waiting for the tower (a 2-layer CLIP tower stayed under 50% object colour accuracy after 300
    joint steps, and reaches 100% in 100 steps alone)."""
    params = [p for p in (*model.model.parameters(), *aux_heads.parameters()) if p.requires_grad]
    params = list({id(p): p for p in params}.values())
    embed = model.get_input_embeddings().weight
    params = [p for p in params if p is not embed]  # grounding targets stay where they are
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    acc = 0.0
    step = 0
    index = 0
    for step in range(1, max_steps + 1):
        items = [make_item(seed + 2000, "train", index + i, n_objects=5) for i in range(batch_size)]
        index += batch_size
        pixels = processor.image_processor([it.image for it in items], return_tensors="pt")
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 30)
        _image_features(model, family, dict(pixels))
        loss = aux_heads.loss(captured["feat"], items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = 0.9 * acc + 0.1 * aux_heads.object_accuracy(captured["feat"], items)
        if step % 50 == 0:
            print(f"[{family}] vision step {step}: loss {loss.item():.3f}, object accuracy {acc:.3f}", flush=True)
        if acc >= target:
            break
    return {"vision_steps": step, "vision_object_acc": round(acc, 4)}


def train(
    family: str,
    out: str | Path,
    minutes: float = 50.0,
    target: float = 0.95,
    batch_size: int = 32,
    lr: float = 2e-3,
    aux_weight: float = 1.0,
    curriculum_acc: float = 0.8,
    extra_qa: int = 0,
    ground: bool = True,
    eval_every: int = 100,
    val_size: int = 300,
    seed: int = 0,
    threads: int = 1,
    layers: int = 8,
    hidden: int = 128,
    pointer_weight: float = 1.0,
    pointer_layer: int = 3,
    vision_steps: int = 600,
    vision_target: float = 0.97,
    freeze_vision: bool = False,
    gather_layer: int = -1,
    init_from: str | Path | None = None,
    clip: float = 1.0,
) -> dict:
    """Train one demo model and save it to ``out``; returns the training record (also ``train_log.json``)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if gather_layer != -1 and not (pointer_weight > 0 and 0 <= gather_layer < pointer_layer):
        # Its head 0 would be a pointer head at the pointer layer, and it needs the pointer's attentions.
        raise ValueError(f"gather_layer must be -1 (off) or in [0, pointer_layer={pointer_layer}) with "
                         f"pointer_weight > 0, got gather_layer={gather_layer}, pointer_weight={pointer_weight}")
    if not 0.0 < vision_target <= 1.0:
        raise ValueError(f"vision_target is an object accuracy in (0, 1], got {vision_target}")
    if init_from is not None and not (Path(init_from) / "config.json").is_file():
        raise FileNotFoundError(f"init_from must be a trained demo model folder (with config.json), got {str(init_from)!r}")
    torch.set_num_threads(threads)
    random.seed(seed)
    processor = build_processor(family)
    model = build_model(family, processor.tokenizer, layers=layers, hidden=hidden, seed=seed)
    init = init_decoder_from(model, processor.tokenizer, init_from) if init_from else {}
    if init:
        print(f"[{family}] decoder initialised from {init}", flush=True)
    if pointer_weight > 0:
        model.set_attn_implementation("eager")  # attention weights for the pointer loss
    image_token_id = model.config.image_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{family}] {n_params / 1e6:.2f}M parameters", flush=True)

    word_ids = None
    if ground:
        tok = processor.tokenizer
        words = ["object", *COLORS, *SHAPES]  # "object" stands for background
        word_ids = torch.tensor(tok.convert_tokens_to_ids(words))
    aux_heads = _AuxHeads(
        model.config.text_config.hidden_size, model.get_input_embeddings() if ground else None, word_ids
    )
    _fast_patch_embed(model, family)
    captured: dict[str, torch.Tensor] = {}
    hook = _vision_output_module(model, family).register_forward_hook(
        lambda m, a, o: captured.__setitem__("feat", o if isinstance(o, torch.Tensor) else o[0])
    )
    t_start = time.time()
    vision = (pretrain_vision(model, family, processor, aux_heads, captured, vision_steps, lr, seed, target=vision_target)
              if vision_steps else {})
    if freeze_vision:
        print(f"[{family}] vision tower frozen ({freeze_vision_tower(model, family) / 1e6:.2f}M parameters)", flush=True)
    # The grounding head borrows the decoder's embedding (read only): list it once, or AdamW steps it twice.
    own = {id(p) for p in model.parameters()}
    params = list(model.parameters()) + [p for p in aux_heads.parameters() if id(p) not in own]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    val = make_split("val", val_size, seed=seed)
    budget = minutes * 60.0 - (time.time() - t_start)
    warmup = 100
    max_objects = 1  # curriculum level: images hold 1..max_objects objects
    level_acc = 0.0  # running training accuracy at the current level
    log: list[dict] = []
    t0 = time.time()
    step = seen = index = 0
    ema: dict[str, float] = {}
    best: tuple[int, float, dict | None] = (0, -1.0, None)  # (curriculum level, val accuracy, weights)
    # SIGTERM ends training early but still scores and saves the model (a shared machine may need it).
    stop: list[bool] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while True:
            elapsed = time.time() - t0
            if elapsed > budget or stop:
                print(f"[{family}] {'stopped' if stop else 'time limit reached'}", flush=True)
                break
            items = []
            for _ in range(batch_size):
                # Object count drawn from the item's own seed stream: deterministic for a given level.
                n = 1 + (index * 7919) % max_objects
                items.append(make_item(seed + 1000, "train", index, n_objects=n))
                index += 1
            model.train()
            extra = [extra_questions(it, extra_qa, seed) for it in items]
            inputs, _ = encode(processor, items, answer=True, extra=extra)
            ids = inputs["input_ids"]
            ans = answer_positions(processor, ids)
            end = torch.zeros_like(ans)
            end[:, 1:] = ans[:, :-1]
            # Loss on each answer word and the end-of-turn token that follows it.
            labels = torch.where(ans | end, ids, torch.full_like(ids, -100))
            outputs = model(**inputs, labels=labels, output_attentions=pointer_weight > 0,
                            output_hidden_states=pointer_weight > 0)
            lm = outputs.loss
            aux = aux_heads.loss(captured["feat"], items) if aux_weight > 0 else torch.zeros(())
            loss = lm + aux_weight * aux
            pointer = torch.zeros(())
            if pointer_weight > 0:
                targets = [[(it.qtype, it.target)] + [(question_type(q), question_target(it, q)) for q, _ in ex]
                           for it, ex in zip(items, extra, strict=True)]
                pointer = _pointer_loss(outputs.attentions, pointer_layer, ids, ans, image_token_id, targets)
                pointer = pointer + _readout_loss(model, outputs.hidden_states[pointer_layer + 1], ids, ans)
                if gather_layer >= 0:
                    tok = processor.tokenizer
                    keys = [[tok.convert_tokens_to_ids(question_keys(q)) for q in [it.question] + [q for q, _ in ex]]
                            for it, ex in zip(items, extra, strict=True)]
                    pointer = pointer + _gather_loss(outputs.attentions, gather_layer, 0, ids, ans, keys)
                loss = loss + pointer_weight * pointer
            # Warm-up, then cosine decay over the time budget (not steps: the budget is wall time).
            frac = min(1.0, elapsed / budget)
            scale = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            step += 1
            seen += len(items)
            with torch.no_grad():
                prev = torch.zeros_like(ans)
                prev[:, :-1] = ans[:, 1:]
                pred = outputs.logits[prev].argmax(-1)
                batch_acc = (pred == ids[ans]).float().mean().item()
            for k, v in (("lm", lm.item()), ("aux", aux.item()), ("pointer", pointer.item()), ("train_acc", batch_acc)):
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
            # Curriculum: one more object per image once the current level is learnt.
            level_acc = 0.9 * level_acc + 0.1 * batch_acc
            if max_objects < 5 and level_acc >= curriculum_acc:
                max_objects += 1
                level_acc = 0.0
                print(f"[{family}] step {step}: up to {max_objects} objects per image", flush=True)
            if step % eval_every == 0:
                acc = accuracy(score_items(model, processor, val), val)
                rec = {"step": step, "seen": seen, "minutes": round((time.time() - t0) / 60, 2),
                       **{k: round(v, 4) for k, v in ema.items()}, "val_acc": round(acc, 4),
                       "max_objects": max_objects}
                log.append(rec)
                print(f"[{family}] {json.dumps(rec)}", flush=True)
                # Keep the best model of the hardest level reached so far (a late spike of the
                # learning-rate schedule should not cost the saved model), and save it as we go so a
                # killed run still leaves a usable model behind.
                if (max_objects, acc) > best[:2]:
                    best = (max_objects, acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
                    save(model, processor, out, {"family": family, "step": step, "val_acc": acc, "partial": True})
                if acc >= target and max_objects == 5:
                    break
    finally:
        hook.remove()
        signal.signal(signal.SIGTERM, previous)
    if best[2] is not None and (max_objects, log[-1]["val_acc"] if log else 0.0) < best[:2]:
        print(f"[{family}] restoring the best checkpoint (val {best[1]:.3f} at {best[0]} objects)", flush=True)
        model.load_state_dict(best[2])
    train_s = time.time() - t_start
    model.set_attn_implementation("sdpa")
    test = make_split("test", TEST_SIZE, seed=TEST_SEED)
    preds = score_items(model, processor, test)
    by_type = {q: accuracy([p for p, it in zip(preds, test, strict=True) if it.qtype == q], [it for it in test if it.qtype == q])
               for q in ("color", "shape", "exists")}
    record = {
        "family": family, "parameters": n_params, "steps": step, "samples": seen,
        "train_minutes": round(train_s / 60, 2), "threads": threads, "batch_size": batch_size, "lr": lr,
        **vision, "aux_weight": aux_weight, "pointer_weight": pointer_weight, "pointer_layer": pointer_layer,
        "freeze_vision": freeze_vision, "gather_layer": gather_layer, **init, "extra_qa": extra_qa, "ground": ground, "val_acc": log[-1]["val_acc"] if log else None,
        "test_acc": round(accuracy(preds, test), 4),
        "test_acc_by_type": {k: round(v, 4) for k, v in by_type.items()}, "log": log,
    }
    print(f"[{family}] test accuracy {record['test_acc']:.3f} {record['test_acc_by_type']}", flush=True)
    save(model, processor, out, record)
    return record


def save(model: nn.Module, processor: Any, out: str | Path, record: dict | None = None) -> Path:
    """``save_pretrained`` model, processor, tokenizer, chat template and generation config into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(out)
    if record is not None:
        (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2drop_eval.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=FAMILIES, required=True)
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--minutes", type=float, default=50.0, help="wall-time budget for training (default 50)")
    p.add_argument("--target", type=float, default=0.95, help="stop at this validation accuracy (default 0.95)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-cell vision loss (0: off)")
    p.add_argument("--curriculum-acc", type=float, default=0.8,
                   help="training accuracy at which images get one more object (default 0.8)")
    p.add_argument("--extra-qa", type=int, default=0,
                   help="extra question turns per training image (default 0: later turns can copy answers from "
                        "earlier questions instead of looking)")
    p.add_argument("--no-ground", action="store_true", help="no grounding loss on the image tokens")
    p.add_argument("--pointer-weight", type=float, default=1.0,
                   help="weight of the attention-pointer loss (head 0 of --pointer-layer looks at the answer's "
                        "image token; 0: off)")
    p.add_argument("--pointer-layer", type=int, default=3)
    p.add_argument("--vision-steps", type=int, default=600,
                   help="phase 1: at most this many steps of the vision tower alone on per-cell labels (0: off)")
    p.add_argument("--vision-target", type=float, default=0.97,
                   help="phase 1 ends at this object accuracy (running mean; default 0.97)")
    p.add_argument("--freeze-vision", action="store_true",
                   help="after phase 1 train only the projector / merger of the vision side (faster steps)")
    p.add_argument("--gather-layer", type=int, default=-1,
                   help="also teach head 0 of this layer (below --pointer-layer) to look from the answer position "
                        "at the question's key words, the lookup's first hop (default -1: off)")
    p.add_argument("--init-from", default=None,
                   help="start the language decoder from this trained demo model folder (either family)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU may be shared)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(
        args.family, args.out, minutes=args.minutes, target=args.target, batch_size=args.batch_size, lr=args.lr,
        aux_weight=args.aux_weight, curriculum_acc=args.curriculum_acc, extra_qa=args.extra_qa, ground=not args.no_ground, eval_every=args.eval_every,
        pointer_weight=args.pointer_weight, pointer_layer=args.pointer_layer, vision_steps=args.vision_steps,
        vision_target=args.vision_target, freeze_vision=args.freeze_vision,
        gather_layer=args.gather_layer, init_from=args.init_from,
        clip=args.clip, seed=args.seed, threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
