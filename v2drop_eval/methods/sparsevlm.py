"""``sparsevlm``: SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", ICML 2025). Text-guided: prompt tokens rate the vision tokens.

Read from the authors' repository, Gumpest/SparseVLMs, tag ``v1.5`` (commit b9619e6; code identical to the
merge 8435974 that released it), the version whose counts the ICML paper's Table 1 reports (192 / 128 / 64
tokens on LLaVA-1.5-7B): ``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel
.forward``), ``score.py`` (``attn_postprocess_topk``, ``sparse_token_dict``) and ``utils.py``
(``cluster_and_merge``). Apache-2.0. The rule, per image:

1. Raters, once per prefill: the text tokens after the image whose mean over the image tokens of
   ``softmax_text(v @ t^T)`` (input embeddings, model dtype) is above that mean's mean.
2. At each sparse layer l (2, 6, 15 of LLaVA-1.5-7B's 32): layer l's attention probabilities, averaged
   over heads, the raters' rows averaged, on the image tokens; keep the top ``count`` of them
   (``sparse_token_list_192 = [300, 200, 110]``, ``_128 = [303, 110, 36]``, ``_64 = [66, 30, 17]``,
   ``min(count, alive - 1)``). Tokens are dropped from layer l's *output*, so here the stage sits at
   drop layer l + 1 with the score from layer l (``PREV_QUERY_ATTENTION``).
3. Recycling: of the dropped tokens, the ``int(d x 0.3) + 1`` best rated are clustered into
   ``int(m / 10) + 1`` tokens by density peaks (kNN density with k = the cluster count, distance to the
   nearest denser token, centres = top density x distance) and averaged per cluster; the recycled tokens
   follow the kept image tokens and count as image tokens at the next stage.
4. Positions: the kept sequence is renumbered 0..n-1 (``position_ids[:, :len(kept)]``) and a new token at
   decode takes its layer's cache length (``get_usable_length``), so ``positions = RENUMBER``.

What differs, and why (docs/methods.md, "SparseVLM"):
- Counts: the original's absolute counts are for 576 tokens; here each stage keeps ``floor(alive x r)``
  with r chosen so that 576 tokens keep exactly the original's counts (tests check them), so other token
  counts keep the same shares.
- Any batch and several images: each row rates and recycles its own tokens; the vision tokens of a row
  are all its images' and videos', the raters come from the text after its last vision token, the
  recycled tokens follow that vision token. The original runs one image at batch size 1.
- The density noise (``torch.rand(...) * 1e-6``, which only breaks density ties) comes from a generator
  seeded with 0 per clustering instead of torch's global random state, so a row clusters the same alone
  and in any batch, run after run.
- A row whose raters' scores are all equal (the original would then have no rater and rate with NaN)
  takes all its text after the image as raters.
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the repository has no code for them. A recycled token has no place on
  M-RoPE's image grid, so there every token keeps its position and a recycled token takes its cluster
  centre's (as ModelTC/llmc's SparseVLM, ``llmc/compression/token_reduction/sparsevlm.py``, does;
  ``positions=renumber`` is refused there); the presets are derived below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from v2drop_eval.engine.method import (
    PREV_QUERY_ATTENTION,
    RENUMBER,
    Merge,
    Method,
    QueryContext,
    ScoreContext,
)
from v2drop_eval.engine.schedule import DropSchedule, kept_count

if TYPE_CHECKING:
    import torch

# Recycling (modelling_sparse_llama.py): the top 30% (+1) of the dropped tokens by rating, merged into a
# tenth (+1) as many clusters.
RECYCLE_SHARE = 0.3
CLUSTER_DIVISOR = 10
DENSITY_NOISE = 1e-6  # cluster_and_merge's tie-breaking noise on the densities
NOISE_SEED = 0
# Pairwise distances are computed in row blocks of at most this many elements (the original's [N, N, C]
# broadcast, block by block: the same values, bounded memory).
BLOCK_ELEMENTS = 1 << 26

# The original's counts (score.py, v1.5) for LLaVA-1.5-7B's 576 image tokens at sparse layers 2, 6, 15.
ORIGINAL_LAYERS = (2, 6, 15)
ORIGINAL_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}

# "llava": the original's setting: drop layers 3, 7, 16 (after sparse layers 2, 6, 15), each ratio the shortest
# decimal with floor(alive x r) equal to the original's count when 576 tokens enter (the alive count includes
# the tokens recycled before), e.g. 192: 576 -> 300 (+9 recycled) -> 200 (+4) -> 110 (+3).
# Qwen tables: the sparse layers scaled to the depth (round(l x L / 32)), the later ratios of the LLaVA preset
# of the same budget kept, the first solved (to 0.001) so that the layer-averaged count with recycling is
# closest to the V2Drop preset of that family and budget, as PyramidDrop's are (``default``: the 128 shape; docs/methods.md,
# "SparseVLM"; tests/test_sparsevlm.py re-derives them).
PRESETS: dict[str, dict[str | int, str]] = {
    "llava": {
        192: "3:0.521/7:0.65/16:0.54",  # 206.5 layer-averaged (recycled tokens included)
        128: "3:0.527/7:0.353/16:0.31",  # 145.4
        64: "3:0.115/7:0.37/16:0.54",  # 82.3
    },
    "qwen2_vl": {  # 28 layers: sparse layers 2, 5, 13
        "default": "3:0.414/6:0.353/14:0.31",  # 130.2 (V2Drop 130.3); the 128 shape
        192: "3:0.457/6:0.65/14:0.54",  # 192.4 (V2Drop 192.5)
        128: "3:0.395/6:0.353/14:0.31",  # 127.1 (V2Drop 127.1)
    },
    "qwen3_vl": {  # 36 layers: sparse layers 2, 7, 17
        "default": "3:0.452/8:0.353/18:0.31",  # 130.6 (V2Drop 130.6)
        192: "3:0.476/8:0.65/18:0.54",  # 191.7 (V2Drop 192.0)
        128: "3:0.428/8:0.353/18:0.31",  # 126.4 (V2Drop 126.7)
    },
}


def recycled_count(dropped: int) -> int:
    """How many recycled tokens ``dropped`` dropped vision tokens make (0 when none is dropped)."""
    if dropped <= 0:
        return 0
    rated = int(dropped * RECYCLE_SHARE) + 1
    return int(rated / CLUSTER_DIVISOR) + 1


def stage_counts(num_vision_tokens: int, schedule: DropSchedule) -> list[tuple[int, int]]:
    """Per stage of ``schedule``: (vision tokens kept, recycled tokens added) for an image of that many tokens."""
    alive, out = int(num_vision_tokens), []
    for _, ratio in schedule.stages:
        keep = kept_count(alive, ratio)
        added = recycled_count(alive - keep)
        out.append((keep, added))
        alive = keep + added
    return out


def density_peaks(x: torch.Tensor, k: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_and_merge``'s clustering of the rows of ``x [N, C]`` into ``k`` clusters: (cluster of each row
    ``[N]``, the centre rows ``[k]`` in the original's order). ``noise [N]``: added to the densities."""
    import torch

    N, C = x.shape
    step = max(1, BLOCK_ELEMENTS // max(1, N * C))
    dist = torch.cat([(x[i:i + step, None, :] - x[None, :, :]).norm(dim=-1, p=2) for i in range(0, N, step)])
    dist = dist / (C ** 0.5)
    nearest = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp() + noise
    denser = (density[None, :] > density[:, None]).to(x.dtype)  # [i, j]: j is denser than i
    far = dist.flatten().max()
    parent_dist = (dist * denser + far * (1 - denser)).min(dim=-1).values
    centres = torch.topk(parent_dist * density, k=k, dim=-1).indices
    cluster = dist[centres].argmin(dim=0)
    cluster[centres] = torch.arange(k, device=x.device)
    return cluster, centres


def density_noise(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n]`` the tie-breaking noise added to the densities: seeded, so a row clusters the same in any run."""
    import torch

    gen = torch.Generator().manual_seed(NOISE_SEED)
    return (torch.rand(n, generator=gen, dtype=dtype) * DENSITY_NOISE).to(device)


class SparseVLM(Method):
    name = "sparsevlm"
    label = "SparseVLM"
    summary = ("keeps the vision tokens its text raters attend to most at the layer before; recycles the best "
               "dropped ones into a few merged tokens")
    source = "Zhang et al., 'SparseVLM', ICML 2025; github.com/Gumpest/SparseVLMs (v1.5)"
    needs = frozenset({PREV_QUERY_ATTENTION})
    positions = RENUMBER  # on M-RoPE kept (engine/positions.py: merged tokens have no grid position there)
    presets = PRESETS
    style = ("tab:cyan", "h")

    def query_rows(self, ctx: QueryContext) -> torch.Tensor:
        """The raters: per row, the text tokens after its last vision token whose mean softmax affinity to
        the vision tokens (input embeddings) is above average."""
        import torch

        B, S = ctx.vision.shape
        slots = torch.arange(S, device=ctx.vision.device)
        raters = torch.zeros(B, S, dtype=torch.bool, device=ctx.vision.device)
        for b in range(B):
            vision = ctx.vision[b]
            if not bool(vision.any()):
                continue
            last = int(slots[vision].max())
            after = ctx.text[b] & (slots > last)
            v_t, t_t = ctx.embeddings[b, vision][None], ctx.embeddings[b, after][None]
            affinity = (v_t @ t_t.transpose(1, 2)).softmax(dim=2).mean(dim=1)[0]  # [text after]
            chosen = affinity > affinity.mean()
            raters[b, slots[after][chosen if bool(chosen.any()) else slice(None)]] = True
        return raters

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        import torch

        rows, valid = ctx.signals[PREV_QUERY_ATTENTION]
        out = torch.zeros(rows.shape[0], rows.shape[2], dtype=rows.dtype, device=rows.device)
        for b in range(rows.shape[0]):
            if bool(valid[b].any()):
                out[b] = rows[b][valid[b]][None].mean(dim=1)[0]
        return out

    def merge(self, ctx: ScoreContext, scores: torch.Tensor, kept: torch.Tensor) -> Merge | None:
        import torch

        B, n = kept.shape
        plans = []
        for b in range(B):
            dropped = (ctx.candidates[b] & ~kept[b]).nonzero()[:, 0]
            if dropped.numel() == 0:
                plans.append(None)
                continue
            rated = int(dropped.numel() * RECYCLE_SHARE) + 1
            members = dropped[torch.topk(scores[b, dropped], rated).indices]  # best rated first, as the original
            k = int(rated / CLUSTER_DIVISOR) + 1
            x = ctx.hidden[b, members]
            cluster, centres = density_peaks(x, k, density_noise(rated, x.dtype, x.device))
            ones = torch.ones(rated, dtype=x.dtype, device=x.device)
            weight = ones / (torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, cluster, ones) + 1e-6)[cluster]
            plans.append((members, cluster, weight, members[centres]))
        M = max((len(p[3]) for p in plans if p is not None), default=0)
        if M == 0:
            return None
        weights = torch.zeros(B, M, n, dtype=ctx.hidden.dtype, device=ctx.hidden.device)
        valid = torch.zeros(B, M, dtype=torch.bool, device=kept.device)
        anchor = torch.zeros(B, M, dtype=torch.long, device=kept.device)
        for b, plan in enumerate(plans):
            if plan is None:
                continue
            members, cluster, weight, anchors = plan
            weights[b, cluster, members] = weight
            valid[b, : len(anchors)] = True
            anchor[b, : len(anchors)] = anchors
        return Merge(weights=weights, valid=valid, anchor=anchor)

    def merged_count(self, dropped: int) -> int:
        return recycled_count(dropped)

    def refit(self, scaled: DropSchedule, target: float, num_vision_tokens: int, num_layers: int) -> DropSchedule:
        """The later ratios kept, the first solved (to 0.001) for the layer-averaged count closest to ``target``."""
        (first, _), *rest = scaled.stages
        fits = [DropSchedule(((first, r / 1000), *rest)) for r in range(1, 1001)]
        return min(fits, key=lambda s: abs(s.average_tokens(num_vision_tokens, num_layers, self) - target))


METHOD = SparseVLM()
