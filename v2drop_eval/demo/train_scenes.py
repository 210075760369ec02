"""Train the scenes benchmark's demo models (``scenes.py``) from scratch on a CPU.

    python -m v2drop_eval.demo.train_scenes --family llava --out v2drop_eval/demo/models/scenes_llava \\
        --steps 3000 --seed 0 --threads 1

Both models have the real architectures (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``)
and ship as stock checkpoints. LLaVA sees the 448-pixel scenes at 224 pixels (64 vision tokens, one per
cell), Qwen2-VL at 448 pixels (256 tokens, four per cell). What the training does, and why:

- phase 1, a stand-in for a pre-trained vision encoder: the vision tower and projector (merger) alone
  learn linear probes of each token: the colour, shape and size of the object in its cell, the word
  of a sign, and the cell's row and column. The probes are separate heads that are not saved; nothing
  pulls image features towards the decoder's word embeddings (the first demo's Qwen2-VL model was
  trained with that aid, and its object tokens then changed least entering layer 2, so V2Drop dropped
  them first). After phase 1 only the projector (merger) of the vision side keeps training;
- attention targets (training only): at ``--pointer-layer`` (3) the position that predicts the answer
  is taught where to look: head 0 at the object an attribute question names or at the sign, head 1 at
  the object a presence question asks about (or at position 0, a sink, when there is none) and at a
  relation's first object, head 2 at a relation's second object, head 3 at every object a count
  question counts plus the sink in a fixed proportion (the sink's share then falls with the count);
  a head with no part in a question looks at the sink. At ``--gather-layer`` (1) heads 0 and 1 are
  taught to look at the question's words that name the objects (the lookup's first hop). The answer is
  also read straight after the pointer layer (final norm + LM head), a short gradient path. Without
  such targets a model this small, trained from scratch on one CPU thread, stays at chance for hundreds
  of steps (the first demo's notes);
- a curriculum on the object count (``--levels``): 3, then 10, 20 and 40 objects at most;
- ``--init-from DIR``: start the language decoder from another trained demo model's, the way real
  VLMs start from a pre-trained LLM (the shipped Qwen2-VL model starts from the first LLaVA run's);
- ``--init-from DIR --vision-from DIR`` with one model of the same family: continue it (the whole model;
  its probe heads are not saved, so such a run sets ``--aux-weight 0``). The shipped LLaVA model is the
  first LLaVA run continued this way twice, at a low and then a lower learning rate, on every scene size
  (``make train-demo-scenes``' third and fourth runs): counting was still climbing at the first run's
  time cap.

Training stops at ``--steps`` (or ``--minutes``), or earlier once every sub-task reaches ``--target``
on the validation split (never the test split) at the last level; the test split is scored once, per
sub-task, at the end (``train_log.json`` beside the model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from v2drop_eval.demo.scenes import (
    ANSWERS,
    CANVAS,
    COLORS,
    LAYOUT,
    POST_PROMPT,
    QUESTION_WORDS,
    SHAPES,
    SIZES,
    SUBTASKS,
    TEST_SEED,
    TEST_SIZE,
    WORDS,
    Item,
    make_item,
    make_split,
    prompt_text,
)
from v2drop_eval.demo.train import (
    answer_positions,
    build_model,
    build_processor,
    fast_patch_embed,
    freeze_vision_tower,
    image_features,
    init_decoder_from,
    save,
    vision_output_module,
    words_of,
)
from v2drop_eval.engine.signals import additive_mask

__all__ = ["FAMILIES", "SCENE_WORDS", "TOKENS_PER_SIDE", "build", "token_cells", "chat_messages", "encode", "score_items",
           "accuracy_by_subtask", "Teacher", "train", "main"]

FAMILIES = ("llava", "qwen2_vl")
SCENE_WORDS = words_of(QUESTION_WORDS, POST_PROMPT, " ".join(ANSWERS))
TOKENS_PER_SIDE = {"llava": LAYOUT, "qwen2_vl": 2 * LAYOUT}  # vision tokens per image side (squared: per image)
LEVELS = (3, 10, 20, 40)
# Pointer heads at the pointer layer: head -> {sub-task: which cells it reads}; other sub-tasks: the sink.
HEAD_ROLES: dict[int, dict[str, str]] = {
    0: {"text": "primary", "attribute": "primary"},
    1: {"relation": "primary", "presence": "primary"},
    2: {"relation": "secondary"},
    3: {"count": "count"},
}
# Count targets: the sink weighs as much as this many objects, so its share C / (C + k) encodes k.
COUNT_SINK_OBJECTS = 2.0
RECORD_ATTENTION = "v2drop_demo_record"
EMBED_STD = 1.0


# -- model, prompts, batches --------------------------------------------------------------------------
def build(family: str, seed: int = 0, layers: int = 8, hidden: int = 128) -> tuple[nn.Module, Any]:
    """A fresh model of ``family`` with random weights and its processor, for the scenes benchmark."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    processor = build_processor(family, SCENE_WORDS, qwen_size=CANVAS)
    model = build_model(family, processor.tokenizer, layers=layers, hidden=hidden, seed=seed, kv_heads=4)
    with torch.no_grad():
        # Word embeddings at the residual stream's scale (std 1, not 0.02): with tiny embeddings a word's
        # identity is a small part of its position's state after a few layers, and the lookups that
        # start from the question's words barely learned (the pointer heads found objects, not which).
        model.get_input_embeddings().weight.normal_(0.0, EMBED_STD)
    if family == "llava":
        # CLIP's position embeddings start at std 0.02 against patch features of std ~1: the tower took
        # hundreds of steps to tell cells apart. Started at the patch features' scale it learns them fast.
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, 0.5)
    return model, processor


def token_cells(family: str) -> torch.Tensor:
    """[T] the layout cell (row * 8 + col) under each vision token, in the model's token order."""
    side = TOKENS_PER_SIDE[family]
    k = side // LAYOUT
    r = torch.arange(side)
    return ((r[:, None] // k) * LAYOUT + r[None, :] // k).flatten()


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    """The messages lmms-eval's chat classes build (image part first, then the text), and the answer."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text(question)}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def encode(processor: Any, items: Sequence[Item], answer: bool) -> tuple[dict, torch.Tensor]:
    """Right-padded model inputs (positions as in an unpadded run) and each row's last real index."""
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(chat_messages(it.question, it.answer if answer else None),
                                           tokenize=False, add_generation_prompt=not answer) for it in items]
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        inputs = processor(text=texts, images=[it.image for it in items], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    return dict(inputs), inputs["attention_mask"].sum(1) - 1


@torch.no_grad()
def score_items(model: nn.Module, processor: Any, items: Sequence[Item], batch_size: int = 25) -> list[str]:
    """Greedy first answer token per item, one forward pass each (every answer is one token)."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        inputs, last = encode(processor, chunk, answer=False)
        logits = model(**inputs).logits
        out += processor.tokenizer.convert_ids_to_tokens(logits[torch.arange(len(chunk)), last].argmax(-1).tolist())
    return out


def accuracy_by_subtask(preds: Sequence[str], items: Sequence[Item]) -> dict[str, float]:
    """Exact-match accuracy per sub-task present, and ``all``."""
    out = {}
    for sub in (*SUBTASKS, "all"):
        pairs = [(p, it) for p, it in zip(preds, items, strict=True) if sub in ("all", it.subtask)]
        if pairs:
            out[sub] = round(sum(p == it.answer for p, it in pairs) / len(pairs), 4)
    return out


# -- attention that records its weights at chosen layers (training only) --------------------------------
def _recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """sdpa everywhere, except at modules flagged ``_v2drop_record``: the model's own eager attention
    there, its weights kept on the module for the attention-target losses."""
    if getattr(module, "_v2drop_record", False):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        mask = additive_mask(attention_mask, query.shape[-2], key.shape[-2], query.dtype)
        out, weights = eager(module, query, key, value, mask, **kwargs)
        module._v2drop_weights = weights
        return out, weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORD_ATTENTION, _recording_attention)
AttentionMaskInterface.register(RECORD_ATTENTION, sdpa_mask)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.language_model.layers


# -- labels and targets ---------------------------------------------------------------------------------
def cell_labels(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """[B, 64] per cell: colour, shape, size (0 = no object, else 1 + index), sign word (0 = none)."""
    colors, n = list(COLORS), LAYOUT * LAYOUT
    out = {k: torch.zeros(len(items), n, dtype=torch.long) for k in ("color", "shape", "size", "word")}
    for b, it in enumerate(items):
        for o in it.objects:
            out["color"][b, o.cell] = 1 + colors.index(o.color)
            out["shape"][b, o.cell] = 1 + SHAPES.index(o.shape)
            out["size"][b, o.cell] = 1 + SIZES.index(o.size)
        if it.sign is not None:
            out["word"][b, list(it.sign.cells)] = 1 + WORDS.index(it.sign.word)
    cells = torch.arange(n)
    out["row"], out["col"] = (cells // LAYOUT).expand(len(items), n), (cells % LAYOUT).expand(len(items), n)
    return out


class AuxHeads(nn.Module):
    """Training-only linear probes of each vision token (phase 1's labels); not saved with the model."""

    CLASSES = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "size": 1 + len(SIZES),
               "word": 1 + len(WORDS), "row": LAYOUT, "col": LAYOUT}

    def __init__(self, hidden: int, family: str, embed: nn.Embedding | None = None, tokenizer: Any = None):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in self.CLASSES.items()})
        # The cell's column and row also as one linear coordinate each (in [0, 1]): "left of" is then a
        # difference of two read-outs, not a comparison of two 8-way codes.
        self.coords = nn.Linear(hidden, 2)
        self.register_buffer("cells", token_cells(family), persistent=False)
        # Grounding (``--ground``): object tokens are pulled towards the sum of the decoder's embeddings of
        # their colour, shape and size words, sign tokens towards their word's, background towards zero.
        self.embed = embed
        if embed is not None:
            ids = {k: torch.tensor([0] + tokenizer.convert_tokens_to_ids(list(v)))
                   for k, v in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("word", WORDS))}
            for k, v in ids.items():
                self.register_buffer(f"ids_{k}", v, persistent=False)

    def _labels(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        return {k: v[:, self.cells] for k, v in cell_labels(items).items()}  # per token

    def loss(self, feat: torch.Tensor, items: Sequence[Item]) -> torch.Tensor:
        feat = feat.reshape(len(items), len(self.cells), -1)
        labels = self._labels(items)

        def ce(name: str) -> torch.Tensor:
            return F.cross_entropy(self.heads[name](feat).flatten(0, 1), labels[name].flatten(),
                                   reduction="none").view_as(labels[name])

        def balanced(per_token: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
            # Objects and background weigh the same: most tokens are background in sparse scenes.
            parts = [per_token[m].mean() for m in (on, ~on) if m.any()]
            return sum(parts) / len(parts)

        obj, sign = labels["color"] > 0, labels["word"] > 0
        loss = balanced(ce("color") + ce("shape") + ce("size"), obj) + balanced(ce("word"), sign)
        loss = loss + (ce("row") + ce("col")).mean()
        xy = torch.stack([labels["col"], labels["row"]], -1).float() / (LAYOUT - 1)
        loss = loss + 10.0 * (self.coords(feat) - xy).pow(2).mean()
        if self.embed is not None:
            target = torch.zeros_like(feat)
            for k in ("color", "shape", "size", "word"):
                words = self.embed(getattr(self, f"ids_{k}")).detach()
                words = torch.cat([torch.zeros_like(words[:1]), words[1:]])  # class 0 (none) adds nothing
                target = target + words[labels[k]]
            scale = self.embed.weight.detach().pow(2).sum(-1).mean()
            loss = loss + balanced((feat - target).pow(2).sum(-1) / scale, obj | sign)
        return loss

    @torch.no_grad()
    def accuracy(self, feat: torch.Tensor, items: Sequence[Item]) -> dict[str, float]:
        """Object tokens with colour, shape and size right; sign tokens with the word right; positions."""
        feat = feat.reshape(len(items), len(self.cells), -1)
        labels = self._labels(items)
        pred = {k: h(feat).argmax(-1) for k, h in self.heads.items()}
        obj, sign = labels["color"] > 0, labels["word"] > 0
        ok_obj = (pred["color"] == labels["color"]) & (pred["shape"] == labels["shape"]) & (pred["size"] == labels["size"])
        out = {"object": ok_obj[obj].float().mean().item(),
               "position": ((pred["row"] == labels["row"]) & (pred["col"] == labels["col"])).float().mean().item()}
        if sign.any():
            out["word"] = (pred["word"] == labels["word"])[sign].float().mean().item()
        return out


def key_words(item: Item) -> tuple[list[str], list[str]]:
    """The question's words that name what the answer is read from: (first, second) object; the
    second is only a relation's."""
    w = item.question.rstrip("?").split()
    return {
        "text": (["sign"], []),
        "count": ([w[2]], []),
        "presence": (w[-2:], []),
        "color": ([w[-1]], []),
        "shape": ([w[-2]], []),
        "size": (w[-2:], []),
        "left_right": (w[2:4], w[-2:]),
        "above_below": (w[2:4], w[-2:]),
    }[item.qtype]


def key_positions(items: Sequence[Item], ids: torch.Tensor, tokenizer: Any, image_token_id: int
                  ) -> list[tuple[list[int], list[int]]]:
    """Per row: the positions of the words naming the first and the second object (``key_words``; first
    and last occurrences after the image, so a relation's two objects never share a position)."""
    out = []
    for b, it in enumerate(items):
        start = int((ids[b] == image_token_id).nonzero().max()) + 1
        span = ids[b, start:]
        found: list[list[int]] = []
        for h, words in enumerate(key_words(it)):
            pos = []
            for wid in tokenizer.convert_tokens_to_ids(words):
                hits = (span == wid).nonzero().flatten()
                if len(hits):
                    pos.append(start + int(hits[0] if h == 0 else hits[-1]))
            found.append(sorted(pos))
        out.append((found[0], found[1]))
    return out


def _anchor(keys: tuple[list[int], list[int]], role: str) -> int | None:
    """The position a role's lookup starts from: the last word naming its object."""
    words = keys[1] if role == "secondary" else keys[0]
    return words[-1] if words else None


def pointer_targets(items: Sequence[Item], ids: torch.Tensor, image_token_id: int, family: str,
                    keys: Sequence[tuple[list[int], list[int]]], idle_sink: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pointer layer's targets: ``([B, 4, S] distributions, [B, 4] query positions)``. Head h looks
    from the last word naming its object (``HEAD_ROLES``) at that object's vision tokens; a head with no
    part in an item looks, from the word naming the first object, at the sink (``idle_sink``) or is left
    free (a row of zeros)."""
    cells = token_cells(family)
    per_cell = (TOKENS_PER_SIDE[family] // LAYOUT) ** 2
    out = torch.zeros(ids.shape[0], len(HEAD_ROLES), ids.shape[1])
    query = torch.zeros(ids.shape[0], len(HEAD_ROLES), dtype=torch.long)
    for b, it in enumerate(items):
        image_pos = (ids[b] == image_token_id).nonzero().flatten()
        for h, roles in HEAD_ROLES.items():
            role = roles.get(it.subtask)
            query[b, h] = _anchor(keys[b], role or "primary")
            if role is None and not idle_sink:
                continue
            wanted = it.secondary if role == "secondary" else it.primary
            hits = image_pos[torch.isin(cells, torch.tensor(wanted, dtype=torch.long))] if role else image_pos[:0]
            if role == "count":
                sink = COUNT_SINK_OBJECTS * per_cell
                out[b, h, hits] = 1.0 / (sink + len(hits))
                out[b, h, 0] = sink / (sink + len(hits))
            elif len(hits):
                out[b, h, hits] = 1.0 / len(hits)
            else:
                out[b, h, 0] = 1.0
    return out, query


def gather_targets(keys: Sequence[tuple[list[int], list[int]]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather layer's targets: head 0 (1) looks from the last word naming the first (second) object at
    all the words that name it ("red circle": from "circle" at "red" and itself); no second object: free."""
    out = torch.zeros(len(keys), 2, seq_len)
    query = torch.zeros(len(keys), 2, dtype=torch.long)
    for b, k in enumerate(keys):
        for h, words in enumerate(k):
            if words:
                query[b, h] = words[-1]
                out[b, h, words] = 1.0 / len(words)
    return out, query


def collect_targets(items: Sequence[Item], keys: Sequence[tuple[list[int], list[int]]], answer_query: torch.Tensor,
                    seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The readout layer's targets: from the position that predicts the answer, head h looks at the word
    its pointer head looked from (``HEAD_ROLES``), and at the sink when it has no part."""
    out = torch.zeros(len(items), len(HEAD_ROLES), seq_len)
    for b, it in enumerate(items):
        for h, roles in HEAD_ROLES.items():
            role = roles.get(it.subtask)
            out[b, h, _anchor(keys[b], role) if role else 0] = 1.0
    return out, answer_query[:, None].expand(-1, len(HEAD_ROLES))


def _target_loss(weights: torch.Tensor, targets: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of supervised attention rows against their targets. ``weights`` [B, H, S, S],
    ``targets`` [B, H', S] (the first H' heads; an all-zero row is left free), ``query`` [B, H'] positions."""
    b, h = targets.shape[:2]
    rows = weights[torch.arange(b)[:, None], torch.arange(h)[None, :], query]  # [B, H', S]
    return -(targets * torch.log(rows + 1e-6)).sum(-1).sum() / (targets.sum(-1) > 0).sum().clamp(min=1)


def _readout_loss(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The answer read straight after the pointer layer (final norm + LM head at the query position)."""
    h = model.model.language_model.norm(hidden[torch.arange(ids.shape[0]), query])
    return F.cross_entropy(model.lm_head(h), ids[torch.arange(ids.shape[0]), query + 1])


# -- training ---------------------------------------------------------------------------------------------
class Teacher:
    """Phase 1's optional teacher (``--distill-from``): a trained scenes demo model of the other family whose
    image features (projector / merger output, one per token) the student's features are pulled towards,
    token by token over the same layout cell. Real vision encoders are often distilled from another; here it
    lets the Qwen2-VL model start where the LLaVA model's decoder already reads, so a CPU run of an hour or
    two suffices. Nothing pulls features towards word embeddings: the teacher was trained without that."""

    def __init__(self, source: str | Path, family: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(source)
        self.family = "llava" if self.model.config.model_type == "llava" else "qwen2_vl"
        self.source = str(source)
        self.captured: dict[str, torch.Tensor] = {}
        vision_output_module(self.model, self.family).register_forward_hook(
            lambda m, a, o: self.captured.__setitem__("feat", o if isinstance(o, torch.Tensor) else o[0]))
        # [T_student] the teacher token under each student token (same layout cell; the teacher's first
        # token of that cell when it has several).
        teacher_cells, student_cells = token_cells(self.family), token_cells(family)
        first = {int(c): i for i, c in reversed(list(enumerate(teacher_cells.tolist())))}
        self.index = torch.tensor([first[int(c)] for c in student_cells])

    @torch.no_grad()
    def features(self, items: Sequence[Item]) -> torch.Tensor:
        pixels = self.processor.image_processor([it.image for it in items], return_tensors="pt")
        image_features(self.model, self.family, dict(pixels))
        feat = self.captured["feat"].reshape(len(items), len(token_cells(self.family)), -1)
        return feat[:, self.index]

    def loss(self, feat: torch.Tensor, items: Sequence[Item]) -> torch.Tensor:
        target = self.features(items)
        feat = feat.reshape(target.shape)
        return (feat - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()


def pretrain_vision(model: nn.Module, family: str, processor: Any, heads: AuxHeads, captured: dict, steps: int,
                    lr: float, seed: int, batch_size: int, target: float, teacher: Teacher | None = None) -> dict:
    """Phase 1: the vision side alone learns the per-token probes (and, with a ``teacher``, its features),
    until the running object, word and position accuracies all reach ``target`` or ``steps`` run out."""
    embed = model.get_input_embeddings().weight
    lm = {id(p) for p in model.model.language_model.parameters()} | {id(embed)}
    params = [p for p in (*model.parameters(), *heads.parameters()) if p.requires_grad and id(p) not in lm]
    params = list({id(p): p for p in params}.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    running: dict[str, float] = {}
    step = 0
    for step in range(1, steps + 1):
        items = [make_item(seed + 2000, "train", step * batch_size + i) for i in range(batch_size)]
        pixels = processor.image_processor([it.image for it in items], return_tensors="pt")
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 30)
        image_features(model, family, dict(pixels))
        loss = heads.loss(captured["feat"], items)
        if teacher is not None:
            distill = teacher.loss(captured["feat"], items)
            running["distill"] = 0.9 * running.get("distill", 1.0) + 0.1 * distill.item()
            loss = loss + distill
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in heads.accuracy(captured["feat"], items).items():
            running[k] = 0.9 * running.get(k, 0.0) + 0.1 * v
        if step % 25 == 0:
            print(f"[{family}] vision step {step}: loss {loss.item():.3f} "
                  + " ".join(f"{k} {v:.3f}" for k, v in running.items()), flush=True)
        if step >= 50 and all(v >= target for k, v in running.items() if k != "distill"):
            break
    return {"vision_steps": step, **{f"vision_{k}_acc": round(v, 4) for k, v in running.items() if k != "distill"},
            **({"distill_from": teacher.source, "distill_loss": round(running["distill"], 4)} if teacher else {})}


def copy_vision(model: nn.Module, family: str, source: str | Path) -> int:
    """Phase 1's result from another trained model of the same family: every vision tower and projector
    (merger) weight. For experiments on the later phase only: the shipped recipe runs phase 1 itself."""
    from safetensors.torch import load_file

    src = load_file(str(Path(source) / "model.safetensors"))
    parts = ("vision_tower", "multi_modal_projector") if family == "llava" else ("visual",)
    mine = {f"{part}.{k}": v for part in parts for k, v in getattr(model.model, part).state_dict().items()}
    with torch.no_grad():
        for name, tensor in mine.items():
            tensor.copy_(src[name] if name in src else src[f"model.{name}"])
    return len(mine)


def train(family: str, out: str | Path, steps: int = 3000, minutes: float = 120.0, target: float = 0.95,
          batch_size: int = 32, lr: float = 2e-3, seed: int = 0, threads: int = 1, layers: int = 8, hidden: int = 128,
          vision_steps: int = 600, vision_target: float = 0.97, vision_batch: int = 32, pointer_layer: int = 3,
          gather_layer: int = 1, pointer_weight: float = 1.0, aux_weight: float = 1.0,
          levels: Sequence[int] = LEVELS, curriculum_acc: float = 0.8, init_from: str | Path | None = None,
          eval_every: int = 200, val_size: int = 250, clip: float = 1.0, idle_sink: bool = True,
          ground: bool = False, vision_from: str | Path | None = None, distill_from: str | Path | None = None) -> dict:
    """Train one scenes demo model and save it to ``out``; returns the training record (``train_log.json``)."""
    if not 0 <= gather_layer < pointer_layer < layers - 1:
        raise ValueError(f"need 0 <= gather_layer < pointer_layer < layers - 1, got {gather_layer}, {pointer_layer}, {layers}")
    if not levels or any(not 1 <= n <= 40 for n in levels) or list(levels) != sorted(levels):
        raise ValueError(f"levels must be increasing object counts in [1, 40], got {list(levels)}")
    for name, folder in (("init_from", init_from), ("vision_from", vision_from), ("distill_from", distill_from)):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"{name} must be a trained demo model folder (with config.json), got {str(folder)!r}")
    torch.set_num_threads(threads)
    random.seed(seed)
    t_start = time.time()
    model, processor = build(family, seed, layers, hidden)
    init = init_decoder_from(model, processor.tokenizer, init_from) if init_from else {}
    model.set_attn_implementation(RECORD_ATTENTION)
    image_token_id = model.config.image_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{family}] {n_params / 1e6:.2f}M parameters {init}", flush=True)
    heads = AuxHeads(model.config.text_config.hidden_size, family,
                     model.get_input_embeddings() if ground else None, processor.tokenizer)
    fast_patch_embed(model, family)
    captured: dict[str, torch.Tensor] = {}
    hook = vision_output_module(model, family).register_forward_hook(
        lambda m, a, o: captured.__setitem__("feat", o if isinstance(o, torch.Tensor) else o[0]))
    if vision_from:
        vision = {"vision_from": str(vision_from), "vision_tensors": copy_vision(model, family, vision_from)}
    else:
        teacher = Teacher(distill_from, family) if distill_from else None
        vision = pretrain_vision(model, family, processor, heads, captured, vision_steps, lr, seed, vision_batch,
                                 vision_target, teacher) if vision_steps else {}
        del teacher
    freeze_vision_tower(model, family)
    own = {id(p) for p in model.parameters()}
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in heads.parameters() if id(p) not in own]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    layers_ = _decoder_layers(model)
    recorded = (layers_[gather_layer].self_attn, layers_[pointer_layer].self_attn, layers_[pointer_layer + 1].self_attn)
    val = make_split("val", val_size, seed=seed)
    tok = processor.tokenizer
    level, level_acc, warmup = 0, 0.0, 100
    log: list[dict] = []
    ema: dict[str, float] = {}
    best: tuple[int, float, dict | None] = (-1, -1.0, None)  # (level, worst sub-task val accuracy, weights)
    t0 = time.time()
    budget = minutes * 60.0 - (t0 - t_start)
    step = index = 0
    stop: list[bool] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while step < steps and time.time() - t0 < budget and not stop:
            items = [make_item(seed + 1000, "train", index + i, max_objects=levels[level]) for i in range(batch_size)]
            index += batch_size
            model.train()
            inputs, _ = encode(processor, items, answer=True)
            ids = inputs["input_ids"]
            ans = answer_positions(processor, ids)
            query = ans.float().argmax(1) - 1  # the position that predicts each row's answer
            end = torch.zeros_like(ans)
            end[:, 1:] = ans[:, :-1]
            labels = torch.where(ans | end, ids, torch.full_like(ids, -100))
            for m in recorded:
                m._v2drop_record = True
            try:
                outputs = model(**inputs, labels=labels, output_hidden_states=True)
            finally:
                for m in recorded:
                    m._v2drop_record = False
            aux = heads.loss(captured["feat"], items)
            keys = key_positions(items, ids, tok, image_token_id)
            seq = ids.shape[1]
            pointer = _target_loss(recorded[1]._v2drop_weights,
                                   *pointer_targets(items, ids, image_token_id, family, keys, idle_sink))
            gather = _target_loss(recorded[0]._v2drop_weights, *gather_targets(keys, seq))
            collect = _target_loss(recorded[2]._v2drop_weights, *collect_targets(items, keys, query, seq))
            readout = _readout_loss(model, outputs.hidden_states[pointer_layer + 2], ids, query)
            loss = outputs.loss + aux_weight * aux + pointer_weight * (pointer + gather + collect + readout)
            frac = step / max(1, steps)
            scale = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            step += 1
            with torch.no_grad():
                pred = outputs.logits[torch.arange(len(items)), query].argmax(-1)
                batch_acc = (pred == ids[torch.arange(len(items)), query + 1]).float().mean().item()
            for k, v in (("lm", outputs.loss.item()), ("aux", aux.item()), ("pointer", pointer.item()),
                         ("gather", gather.item()), ("collect", collect.item()), ("train_acc", batch_acc)):
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
            level_acc = 0.9 * level_acc + 0.1 * batch_acc
            if level + 1 < len(levels) and level_acc >= curriculum_acc:
                level, level_acc = level + 1, 0.0
                print(f"[{family}] step {step}: up to {levels[level]} objects per scene", flush=True)
            if step % eval_every == 0 or step == steps:
                by = accuracy_by_subtask(score_items(model, processor, val), val)
                rec = {"step": step, "seen": index, "minutes": round((time.time() - t0) / 60, 2),
                       **{k: round(v, 4) for k, v in ema.items()}, "val": by, "max_objects": levels[level]}
                log.append(rec)
                print(f"[{family}] {json.dumps(rec)}", flush=True)
                worst = min(v for k, v in by.items() if k != "all")
                if (level, worst) > best[:2]:
                    best = (level, worst, {k: v.detach().clone() for k, v in model.state_dict().items()})
                    _save(model, processor, out, {"family": family, "step": step, "val": by, "partial": True})
                if worst >= target and level == len(levels) - 1:
                    break
    finally:
        hook.remove()
        signal.signal(signal.SIGTERM, previous)
    if best[2] is not None:
        model.load_state_dict(best[2])
    train_minutes = (time.time() - t_start) / 60
    model.set_attn_implementation("sdpa")
    test = make_split("test", TEST_SIZE, seed=TEST_SEED)
    test_acc = accuracy_by_subtask(score_items(model, processor, test), test)
    record = {
        "family": family, "benchmark": "scenes", "parameters": n_params, "steps": step, "samples": index,
        "train_minutes": round(train_minutes, 2), "threads": threads, "seed": seed, "batch_size": batch_size,
        "lr": lr, **vision, "pointer_layer": pointer_layer, "gather_layer": gather_layer,
        "pointer_weight": pointer_weight, "aux_weight": aux_weight, "idle_sink": idle_sink, "ground": ground,
        "levels": list(levels),
        **init,
        "best_level": levels[best[0]] if best[0] >= 0 else None, "best_val_worst_subtask": best[1],
        "test_acc": test_acc, "log": log,
    }
    if init_from and vision_from and Path(init_from).resolve() == Path(vision_from).resolve():
        # A continued model keeps the records of the runs it continues (oldest first), so one log tells its story.
        earlier_log = Path(init_from) / "train_log.json"
        if earlier_log.is_file():
            earlier = json.loads(earlier_log.read_text())
            record["previous_runs"] = [*earlier.pop("previous_runs", []), earlier]
    print(f"[{family}] test accuracy {json.dumps(test_acc)} ({train_minutes:.1f} min)", flush=True)
    _save(model, processor, out, record)
    return record


def _save(model: nn.Module, processor: Any, out: str | Path, record: dict) -> None:
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # the saved config names a stock kernel
    try:
        save(model, processor, out, record)
    finally:
        model.set_attn_implementation(impl)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2drop_eval.demo.train_scenes", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=FAMILIES, required=True)
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--steps", type=int, default=3000, help="joint training steps (the learning-rate schedule's length)")
    p.add_argument("--minutes", type=float, default=120.0, help="wall-time limit for the whole run (default 120)")
    p.add_argument("--target", type=float, default=0.95,
                   help="stop once every sub-task reaches this validation accuracy at the last level")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vision-steps", type=int, default=600, help="phase 1: at most this many steps (0: off)")
    p.add_argument("--vision-target", type=float, default=0.97)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--pointer-layer", type=int, default=3)
    p.add_argument("--gather-layer", type=int, default=1)
    p.add_argument("--pointer-weight", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--vision-from", default=None,
                   help="skip phase 1: copy the vision side of this trained model of the same family (with --init-from from the same model: continue it)")
    p.add_argument("--distill-from", default=None,
                   help="phase 1 also pulls the image features towards this trained demo model's, token by token")
    p.add_argument("--ground", action="store_true",
                   help="pull image features towards the decoder's word embeddings of their colour, shape, size, word")
    p.add_argument("--free-idle-heads", action="store_true",
                   help="a pointer head with no part in a question is left free (default: it looks at the sink)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="curriculum: object-count caps, comma list")
    p.add_argument("--curriculum-acc", type=float, default=0.8)
    p.add_argument("--init-from", default=None, help="start the language decoder from this trained demo model")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--val-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args.family, args.out, steps=args.steps, minutes=args.minutes, target=args.target,
          batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
          vision_steps=args.vision_steps, vision_target=args.vision_target, vision_batch=args.vision_batch,
          pointer_layer=args.pointer_layer, gather_layer=args.gather_layer, pointer_weight=args.pointer_weight,
          aux_weight=args.aux_weight, levels=[int(x) for x in args.levels.split(",")],
          curriculum_acc=args.curriculum_acc, init_from=args.init_from, eval_every=args.eval_every,
          val_size=args.val_size, idle_sink=not args.free_idle_heads,
          ground=args.ground, vision_from=args.vision_from, distill_from=args.distill_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
