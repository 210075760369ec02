"""``visionzip``: VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025), training-free mode. Text-agnostic; it runs before the LLM, so the LLM sees a shorter
sequence from its first layer.

As the authors' code does (dvlab-research/VisionZip@3151f6d, ``visionzip/clip_encoder.py``
``CLIPVisionTower_VisionZip.forward``, with ``visionzip/utils.py`` ``CLIPAttention_forward`` and
``apply_info``), per crop of the vision encoder, at the block whose output the model reads (LLaVA-1.5:
``hidden_states[-2]`` and ``attentions[-2]``):

- dominant: the [CLS] token plus the ``D - 1`` patches the [CLS] query attends to most (attention
  summed over heads; ``visionzip(model, dominant=D)`` passes ``dominant_num = D - 1``), in patch order;
- contextual: the remaining patches' keys (averaged over heads, L2-normalised) are split into ``C``
  targets, every ``floor(M / C)``-th one (M remaining), and the others; each other is assigned to the
  target of highest cosine similarity; a contextual token is its target's hidden state plus the mean of
  the hidden states assigned to it;
- the LLM gets ``[dominant..., contextual...]`` (D + C tokens) through the projector, positions
  renumbered ``0..L-1`` over the shorter sequence (the authors' ``prepare_inputs_labels_for_multimodal``).

Presets: the paper's and the README's counts, 192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10, for
CLIP-ViT-L/14-336 (576 patches); on an encoder with another patch count the preset scales
(:func:`fit_counts`). What differs from the reference: docs/methods.md, "VisionZip".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from v2drop_eval.engine.method import RENUMBER, Method
from v2drop_eval.engine.schedule import ZipCounts

if TYPE_CHECKING:
    import torch

# The encoder shape the counts were published for: CLIP-ViT-L/14 at 336 px.
PRESET_PATCHES = 576
PRESETS: dict[str, dict[str | int, str]] = {"llava": {192: "0:162+30", 128: "0:108+20", 64: "0:54+10"}}


class VisionZip(Method):
    name = "visionzip"
    label = "VisionZip"
    summary = "keeps the tokens the encoder's [CLS] attends to most and merges the rest by similarity, before the LLM"
    source = "Yang et al., CVPR 2025; github.com/dvlab-research/VisionZip"
    multi_stage = False
    pre_llm = True
    positions = RENUMBER  # prepare_inputs_labels_for_multimodal numbers the shorter sequence 0..L-1
    presets = PRESETS

    style = ("tab:olive", ">")

    def score(self, ctx: object) -> torch.Tensor:
        raise TypeError("visionzip does not score inside the decoder; it runs at the vision encoder's output")

    def pre_llm_tokens(self, hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor,
                       dominant: int, contextual: int) -> torch.Tensor:
        return visionzip_tokens(hidden, cls_attention, keys, dominant, contextual)

    def pre_llm_problem(self, counts: ZipCounts, patches: int) -> str | None:
        return check_counts(counts, patches)

    def fit_pre_llm(self, counts: ZipCounts, patches: int) -> ZipCounts:
        return fit_counts(counts, patches)


def fit_counts(counts: ZipCounts, patches: int) -> ZipCounts:
    """The preset's counts for an encoder with ``patches`` patches per crop: unchanged at 576; otherwise
    the total ``round((D + C) x patches / 576)`` (at least 2) split in the preset's proportion (at least one
    contextual token, at least the [CLS] as dominant)."""
    if patches == PRESET_PATCHES:
        return counts
    total = max(2, min(patches, round(counts.tokens * patches / PRESET_PATCHES)))
    contextual = min(total - 1, max(1, round(total * counts.contextual / counts.tokens)))
    return ZipCounts(total - contextual, contextual)


def check_counts(counts: ZipCounts, patches: int) -> str | None:
    """Why ``counts`` cannot run on crops of ``patches`` patches (None if they can)."""
    left = patches - (counts.dominant - 1)
    if counts.dominant - 1 > patches or left < counts.contextual:
        return (f"VisionZip {counts.dominant}+{counts.contextual} needs {counts.dominant - 1} dominant patches and "
                f"{counts.contextual} contextual targets among the rest, but the encoder has {patches} patches per "
                f"crop; give D - 1 + C <= {patches}")
    return None


def visionzip_tokens(hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int) -> torch.Tensor:
    """VisionZip's tokens of each crop, ``[B, dominant + contextual, d]``.

    ``hidden [B, 1 + N, d]``: the feature layer's hidden states, [CLS] first; ``cls_attention [B, N]``: the
    [CLS] row's attention over the patches at that block, summed over heads; ``keys [B, 1 + N, k]``: that
    block's keys averaged over heads.
    """
    import torch

    B, T, d = hidden.shape
    top = cls_attention.topk(dominant - 1, dim=1).indices + 1
    chosen = torch.cat([top.new_zeros(B, 1), top], dim=1)
    rest = torch.ones(B, T, dtype=torch.bool, device=hidden.device).scatter(1, chosen, False)
    dominant_tokens = hidden[~rest].view(B, dominant, d)  # [CLS] and the dominant patches, in slot order
    m = T - dominant
    others = hidden[rest].view(B, m, d)
    metric = keys[rest].view(B, m, keys.shape[-1])
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, m // contextual)
    targets = torch.arange(0, m, step, device=hidden.device)[:contextual]
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    similarity = metric[:, ~is_target] @ metric[:, targets].transpose(1, 2)  # [B, m - C, C]
    assign = torch.zeros(B, m - len(targets), contextual, dtype=hidden.dtype, device=hidden.device)
    assign.scatter_(2, similarity.argmax(dim=2, keepdim=True), 1)
    counts = assign.sum(dim=1).clamp(min=1)[..., None]  # [B, C, 1]
    merged = (assign.transpose(1, 2) @ others[:, ~is_target]) / counts
    return torch.cat([dominant_tokens, others[:, targets] + merged], dim=1)


METHOD = VisionZip()
