"""Tiny random-weight LLaVA, Qwen2-VL, Qwen3-VL and InternVL models built from configs, and their raw inputs (no tokenizer)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from v2drop_eval.engine.adapters import forward_takes

LAYERS = 6
LLAVA_IMAGE_ID = 100
LLAVA_TOKENS_PER_IMAGE = 16  # 32x32 image, patch 8
QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_START, QWEN_END = 150, 151, 152, 153
# InternVL: 64x64 px tiles, patch 8, pixel shuffle 0.5 -> 16 tokens per tile, each image <img> tiles </img>.
INTERNVL_IMAGE_ID, INTERNVL_START, INTERNVL_END = 150, 152, 153
INTERNVL_TOKENS_PER_TILE = 16
PAD = 0
# Qwen3-VL: DeepStack features are added after decoder layers 0..2 (one per listed vision block).
QWEN3_DEEPSTACK = [0, 1, 2]


def tiny_llava(attn: str = "sdpa", seed: int = 0, vision_layers: int = 2, feature_layer: int = -1,
               image_size: int = 32, layers: int = LAYERS) -> LlavaForConditionalGeneration:
    """``image_size`` px square images, patch 8: (image_size / 8)^2 vision tokens each (16 by default)."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
            image_size=image_size, patch_size=8, projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, pad_token_id=PAD, max_position_embeddings=1024,
        ),
        image_token_id=LLAVA_IMAGE_ID,
        vision_feature_layer=feature_layer,
    )
    model = LlavaForConditionalGeneration(cfg).float().eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD
    return model


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0, vision_layers: int = 2) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=vision_layers, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=QWEN_IMAGE_ID, video_token_id=QWEN_VIDEO_ID,
        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END, pad_token_id=PAD,
    )
    model = Qwen2VLForConditionalGeneration(cfg).float().eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD
    return model


def tiny_qwen2_5_vl(attn: str = "sdpa", seed: int = 0, vision_layers: int = 2,
                    full_attention: tuple[int, ...] = (1,)) -> Qwen2_5_VLForConditionalGeneration:
    """Window attention in every vision block but ``full_attention`` (windows of 2x2 merge groups)."""
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=vision_layers, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
            fullatt_block_indexes=list(full_attention),
        ),
        image_token_id=QWEN_IMAGE_ID, video_token_id=QWEN_VIDEO_ID,
        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END, pad_token_id=PAD,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD
    return model


def tiny_internvl(attn: str = "sdpa", seed: int = 0) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=8,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
            pad_token_id=PAD,
        ),
        image_token_id=INTERNVL_IMAGE_ID, image_seq_length=INTERNVL_TOKENS_PER_TILE,
    )
    model = InternVLForConditionalGeneration(cfg).float().eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD
    return model


def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0, moe: bool = False) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL (``moe=True``: Qwen3-VL-MoE) with interleaved M-RoPE and DeepStack after layers 0..2."""
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=160, max_position_embeddings=512, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    if moe:
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                  deepstack_visual_indexes=QWEN3_DEEPSTACK)
    config_cls, model_cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (
        Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_ID,
                     video_token_id=QWEN_VIDEO_ID, vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END,
                     pad_token_id=PAD)
    model = model_cls(cfg).float().eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD
    return model


def _text(gen: torch.Generator, n: int, vocab: int = 90) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def llava_inputs(images_per_row: list[int], text_lens: list[int] | None = None, seed: int = 0,
                 image_size: int = 32) -> dict:
    """Rows of [text, image tokens..., text] with ``images_per_row[b]`` images each, left-padded
    (``image_size``: as the model was built with)."""
    gen = torch.Generator().manual_seed(seed)
    rows, n_images = [], 0
    for b, k in enumerate(images_per_row):
        t = (text_lens or [5] * len(images_per_row))[b]
        row = [1] + _text(gen, t)
        for _ in range(k):
            row += [LLAVA_IMAGE_ID] * (image_size // 8) ** 2 + _text(gen, 2)
        rows.append(row + _text(gen, 3))
        n_images += k
    ids, mask = _left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, image_size, image_size, generator=gen)
    return out


def qwen_inputs(grids_per_row: list[list[tuple[int, ...]]], seed: int = 0) -> dict:
    """Rows with images of the given patch grids (h, w) and videos of grids (t, h, w) (t in temporal
    patches of 2 frames), e.g. [[(4, 4)], [(4, 6), (2, 2, 2)]], left-padded."""
    gen = torch.Generator().manual_seed(seed)
    rows, grids, vgrids = [], [], []
    for b, row_grids in enumerate(grids_per_row):
        row = _text(gen, 3 + b)
        for grid in row_grids:
            t, h, w = grid if len(grid) == 3 else (1, *grid)
            token = QWEN_VIDEO_ID if len(grid) == 3 else QWEN_IMAGE_ID
            row += [QWEN_START] + [token] * (t * h * w // 4) + [QWEN_END] + _text(gen, 2)
            (vgrids if len(grid) == 3 else grids).append([t, h, w])
        rows.append(row + _text(gen, 3))
    ids, mask = _left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if forward_takes(Qwen2VLForConditionalGeneration, "mm_token_type_ids"):
        out["mm_token_type_ids"] = (ids == QWEN_IMAGE_ID).long() + 2 * (ids == QWEN_VIDEO_ID).long()
    for key, g in (("image", grids), ("video", vgrids)):
        if g:
            grid = torch.tensor(g)
            out[f"{key}_grid_thw"] = grid
            pixels = "pixel_values" if key == "image" else "pixel_values_videos"
            out[pixels] = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=gen)
    return out


def internvl_inputs(rows_spec: list[list[tuple[str, int]]], seed: int = 0) -> dict:
    """Rows of images and videos, e.g. [[("image", 3)], [("video", 4), ("image", 1)]], left-padded.

    ``("image", k)``: one image cut into k tiles, one <img>...</img> run of 16 x k tokens, as the
    processor writes it; ``("video", k)``: k frames, each its own <img> run of 16 tokens after a
    "FrameN:" text (the processor writes video frames with the image token; InternVL has no video id).
    """
    gen = torch.Generator().manual_seed(seed)
    rows, tiles = [], 0
    for b, spec in enumerate(rows_spec):
        row = _text(gen, 3 + b)
        for kind, k in spec:
            runs = [k] if kind == "image" else [1] * k
            for n in runs:
                frame = _text(gen, 2) if kind == "video" else []  # the "FrameN:" text
                row += frame + [INTERNVL_START] + [INTERNVL_IMAGE_ID] * (INTERNVL_TOKENS_PER_TILE * n) + [INTERNVL_END]
            row += _text(gen, 2)
            tiles += k
        rows.append(row + _text(gen, 3))
    ids, mask = _left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if tiles:
        out["pixel_values"] = torch.randn(tiles, 3, 64, 64, generator=gen)
    return out


def qwen3_inputs(rows: list[list[tuple]], seed: int = 0) -> dict:
    """Rows of images ``("image", h, w)`` and videos ``("video", t, h, w)`` (patch grids), left-padded.
    A video is one run of vision tokens per temporal patch, each after its own timestamp text, as
    Qwen3-VL's processor writes it."""
    gen = torch.Generator().manual_seed(seed)
    token_rows: list[list[int]] = []
    grids: dict[str, list[list[int]]] = {"image": [], "video": []}
    for b, items in enumerate(rows):
        row = _text(gen, 3 + b)
        for kind, *grid in items:
            t, h, w = grid if kind == "video" else (1, *grid)
            token = QWEN_VIDEO_ID if kind == "video" else QWEN_IMAGE_ID
            for _ in range(t):
                row += (_text(gen, 2) if kind == "video" else []) + [QWEN_START] + [token] * (h * w // 4) + [QWEN_END]
            row += _text(gen, 2)
            grids[kind].append([t, h, w])
        token_rows.append(row + _text(gen, 3))
    ids, mask = _left_pad(token_rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if forward_takes(Qwen3VLForConditionalGeneration, "mm_token_type_ids"):
        out["mm_token_type_ids"] = (ids == QWEN_IMAGE_ID).long() + 2 * (ids == QWEN_VIDEO_ID).long()
    for kind, grid_key, pixel_key in (("image", "image_grid_thw", "pixel_values"),
                                      ("video", "video_grid_thw", "pixel_values_videos")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            out[grid_key] = grid
            out[pixel_key] = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=gen)
    return out


def row_inputs(inputs: dict, b: int, family: str) -> dict:
    """Row ``b`` of a batch as its own unpadded batch of one."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b][keep][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    if family in ("llava", "internvl") and "pixel_values" in inputs:
        # one pixel_values entry per image (LLaVA) or per tile (InternVL)
        image_id, per = (LLAVA_IMAGE_ID, LLAVA_TOKENS_PER_IMAGE) if family == "llava" else (
            INTERNVL_IMAGE_ID, INTERNVL_TOKENS_PER_TILE)
        counts = [int((r == image_id).sum()) // per for r in inputs["input_ids"]]
        start = sum(counts[:b])
        if counts[b]:
            out["pixel_values"] = inputs["pixel_values"][start:start + counts[b]]
    return {**out, **_qwen_row_media(inputs, b)}


def _qwen_row_media(inputs: dict, b: int) -> dict:
    """Row ``b``'s grids and patches of images and videos, found by its vision-token counts."""
    out = {}
    for token, grid_key, pixel_key in ((QWEN_IMAGE_ID, "image_grid_thw", "pixel_values"),
                                       (QWEN_VIDEO_ID, "video_grid_thw", "pixel_values_videos")):
        if grid_key not in inputs:
            continue
        grid = inputs[grid_key]
        ends = (grid.prod(-1) // 4).cumsum(0)  # vision tokens up to the end of each image / video
        counts = [int((r == token).sum()) for r in inputs["input_ids"]]
        first, last = sum(counts[:b]), sum(counts[:b + 1])
        g0, g1 = int((ends <= first).sum()), int((ends <= last).sum())
        if g1 > g0:
            patches = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(-1).cumsum(0)])
            out[grid_key] = grid[g0:g1]
            out[pixel_key] = inputs[pixel_key][int(patches[g0]):int(patches[g1])]
    return out


# -- any-resolution LLaVA (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video), through their real processors --
# A word-level tokenizer (no training) so that the processors expand <image> / <video> exactly as for a
# real checkpoint: per-image token counts follow each image's size (any-resolution tiles and newline
# tokens), per-video counts its frames.
ANYRES_TILE = 32  # vision tower input: 32x32 px, patch 8 -> 16 patches per tile
ANYRES_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
_WORDS = [f"w{i}" for i in range(80)]
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]


def word_tokenizer():
    """A tiny word-level tokenizer: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<image>`` 4, ``<video>`` 5, words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left",
                                  extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    return out


ANYRES_VOCAB = 96  # >= len(_SPECIALS + _WORDS), a multiple of 8
ANYRES_IMAGE_ID, ANYRES_VIDEO_ID = 4, 5


def _anyres_text(hidden: int = 64, kind: str = "llama") -> dict:
    return dict(model_type="qwen2" if kind == "qwen2" else "llama", hidden_size=hidden, intermediate_size=128,
                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, vocab_size=ANYRES_VOCAB,
                pad_token_id=PAD, max_position_embeddings=8192)


def _finish(model, attn: str):
    model = model.float().eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD
    return model


def tiny_llava_next(attn: str = "sdpa", seed: int = 0, vision_layers: int = 2):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                       num_attention_heads=2,
                                       image_size=ANYRES_TILE, patch_size=8, projection_dim=32).to_dict(),
        text_config=_anyres_text(), image_token_index=ANYRES_IMAGE_ID, image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return _finish(LlavaNextForConditionalGeneration(cfg), attn)


def tiny_llava_onevision(attn: str = "sdpa", seed: int = 0):
    """SigLIP-like tower (no CLS token), Qwen2 decoder: 16 tokens per tile, 4 per video frame (2x2 pooling)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=ANYRES_TILE, patch_size=8),
        text_config=_anyres_text(kind="qwen2"), image_token_index=ANYRES_IMAGE_ID, video_token_index=ANYRES_VIDEO_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return _finish(LlavaOnevisionForConditionalGeneration(cfg), attn)


def tiny_llava_next_video(attn: str = "sdpa", seed: int = 0):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=ANYRES_TILE, patch_size=8, projection_dim=32).to_dict(),
        text_config=_anyres_text(), image_token_index=ANYRES_IMAGE_ID, video_token_index=ANYRES_VIDEO_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="default",
        spatial_pool_stride=2,
    )
    return _finish(LlavaNextVideoForConditionalGeneration(cfg), attn)


def anyres_processor(kind: str):
    """The real processor of ``kind`` (``llava_next``, ``llava_onevision``, ``llava_next_video``) for the tiny models."""
    import transformers as tf

    tok = word_tokenizer()
    if kind == "llava_next":
        image = tf.LlavaNextImageProcessor(size={"shortest_edge": ANYRES_TILE}, image_grid_pinpoints=ANYRES_PINPOINTS,
                                           crop_size={"height": ANYRES_TILE, "width": ANYRES_TILE})
        return tf.LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=8,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if kind == "llava_onevision":
        image = tf.LlavaOnevisionImageProcessor(size={"height": ANYRES_TILE, "width": ANYRES_TILE},
                                                image_grid_pinpoints=ANYRES_PINPOINTS)
        video = tf.LlavaOnevisionVideoProcessor(size={"height": ANYRES_TILE, "width": ANYRES_TILE})
        return tf.LlavaOnevisionProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                          num_image_tokens=16, vision_feature_select_strategy="full",
                                          vision_aspect_ratio="anyres_max_9")
    if kind == "llava_next_video":
        image = tf.LlavaNextImageProcessor(size={"shortest_edge": ANYRES_TILE}, image_grid_pinpoints=ANYRES_PINPOINTS,
                                           crop_size={"height": ANYRES_TILE, "width": ANYRES_TILE})
        video = tf.LlavaNextVideoVideoProcessor(size={"shortest_edge": ANYRES_TILE},
                                                crop_size={"height": ANYRES_TILE, "width": ANYRES_TILE})
        return tf.LlavaNextVideoProcessor(image_processor=image, video_processor=video, tokenizer=tok, patch_size=8,
                                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    raise ValueError(f"unknown kind {kind!r}; allowed: llava_next, llava_onevision, llava_next_video")


def _picture(gen: torch.Generator, w: int, h: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy().astype(np.uint8))


def anyres_inputs(kind: str, rows: list[list[tuple]], seed: int = 0, only: int | None = None) -> dict:
    """Rows of text around ``("image", (w, h))`` and ``("video", frames)`` items, through the processor of
    ``kind``, left-padded. The same spec always gives the same pixels and words, so ``only=b`` builds
    row ``b`` alone, unpadded, exactly as it sits in the batch."""
    gen = torch.Generator().manual_seed(seed)
    texts, images, videos = [], [], []
    for b, items in enumerate(rows):
        words = [_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (16,), generator=gen)]
        parts, row_images, row_videos = [" ".join(words[:2 + b % 3])], [], []
        for k, (what, size) in enumerate(items):
            if what == "image":
                row_images.append(_picture(gen, *size))
                parts.append("<image>")
            elif what == "video":
                frames = torch.randint(0, 256, (size, 40, 48, 3), generator=gen, dtype=torch.uint8).numpy()
                row_videos.append(frames)
                parts.append("<video>")
            else:
                raise ValueError(f"unknown item {what!r}; allowed: image, video")
            parts.append(words[4 + k])
        parts.append(" ".join(words[10:13]))
        if only is None or only == b:
            texts.append(" ".join(parts))
            images.append(row_images)
            videos += row_videos
    proc = anyres_processor(kind)
    kwargs: dict = {"text": texts, "return_tensors": "pt", "padding": True}
    if any(images):
        # One list per text row: LLaVA-OneVision tiles a row's single image, and not a row's several.
        kwargs["images"] = images if kind == "llava_onevision" else [im for row in images for im in row]
    if videos:
        kwargs["videos"] = videos
    out = dict(proc(**kwargs))
    out.pop("batch_num_images", None) if kind != "llava_onevision" else None
    return out
