"""The preset schedules of each method, and how they carry over to models of another depth.

Each method's tables live in its own file (``Method.presets``: family preset table -> budget -> schedule);
this module looks them up, scales them to a shallower model at the same layer-averaged vision-token count,
and derives tables for a new depth (docs/methods.md, "Budgets" and "Presets for a new depth"). Loading it
installs the lookup behind ``DropSchedule.preset`` (the schedule type is the engine's, the tables are here).
"""

from __future__ import annotations

from v2drop_eval.engine.families import PRESET_SHAPES, preset_family
from v2drop_eval.engine.schedule import DropSchedule, install_preset_lookup
from v2drop_eval.methods import DEFAULT_METHOD, REGISTRY, get_method

__all__ = ["DropSchedule", "preset_table", "preset_text", "scaled_schedule", "fitted_preset", "single_stage_for",
           "pdrop_for", "depth_scaled_presets"]


def scaled_schedule(family: str, budget: int | str, method: str, num_layers: int) -> DropSchedule:
    """The preset for ``budget``, with its layers scaled to ``num_layers`` when the model is shallower.

    V2Drop (and random, which shares its presets) scale the preset's layers. Every other method then
    spends the same layer-averaged vision-token count as that scaled V2Drop schedule, counted with its own
    formula: single-stage methods (FastV, DART) keep one stage (layer 2 of 32, scaled) with the matching
    share; multi-stage ones (PyramidDrop) scale their own layers and refit their one ratio (to 0.01), unless
    the method refits itself (``Method.refit``: SparseVLM solves its first ratio, counting its recycled tokens).
    """
    ref_tokens, ref_layers = PRESET_SHAPES[family]
    if num_layers == ref_layers or get_method(method).pre_llm:  # a pre-LLM stage does not depend on depth
        return DropSchedule.preset(family, budget, method=method)
    v2 = _scale_layers(DropSchedule.preset(family, budget, method=DEFAULT_METHOD), num_layers, ref_layers)
    spec = get_method(method)
    if spec.presets is get_method(DEFAULT_METHOD).presets:
        return v2
    target = v2.average_tokens(ref_tokens, num_layers)
    if spec.multi_stage:
        own = _scale_layers(DropSchedule.preset(family, budget, method=method), num_layers, ref_layers)
        refit = spec.refit(own, target, ref_tokens, num_layers)
        if refit is not None:  # a method with its own counting (SparseVLM's recycled tokens)
            return refit
        layers = own.layers
        fits = [DropSchedule(tuple((layer, r / 100) for layer in layers)) for r in range(1, 100)]
        return min(fits, key=lambda s: abs(s.average_tokens(ref_tokens, num_layers, method) - target))
    return single_stage_for(target, ref_tokens, num_layers, layer=max(1, round(2 * num_layers / ref_layers)),
                            method=method)


def single_stage_for(target: float, tokens: int, num_layers: int, layer: int = 2, method: str = "") -> DropSchedule:
    """One stage at ``layer`` whose layer-averaged count over ``num_layers`` layers, counted as ``method``
    counts (``""``: the default method; ``tokens`` vision tokens), is closest to ``target``; of the 4-decimal
    ratios that keep that count, the smallest at or above the share it keeps (the shortest ratio that keeps
    it under a floor)."""
    spec = get_method(method or DEFAULT_METHOD)
    by_count: dict[int, list[float]] = {}
    for step in range(1, 10_000):
        ratio = step / 10_000
        by_count.setdefault(spec.stage_keep(tokens, (ratio,), tokens), []).append(ratio)
    keep = min(by_count, key=lambda k: (abs((layer * tokens + (num_layers - layer) * k) / num_layers - target), k))
    above = [r for r in by_count[keep] if r >= keep / tokens]
    ratio = min(above) if above else max(by_count[keep])
    return DropSchedule(((layer, ratio),))


def pdrop_for(target: float, tokens: int, num_layers: int, method: str = "") -> DropSchedule:
    """PyramidDrop's shape, stages at s, 2s, 3s (s >= 2) with one ratio lambda (to 0.01), within one token
    of ``target`` layer-averaged (counted as ``method`` counts, ``""``: the default method); of those,
    lambda closest to the paper's 0.5 (then the closer average)."""
    fits = [DropSchedule(tuple((k * step, r / 100) for k in (1, 2, 3)))
            for step in range(2, (num_layers - 1) // 3 + 1) for r in range(1, 100)]
    averages = {f: f.average_tokens(tokens, num_layers, method) for f in fits}
    fits = [f for f in fits if abs(averages[f] - target) <= 1]
    return min(fits, key=lambda f: (abs(f.stages[0][1] - 0.5), abs(averages[f] - target)))


def depth_scaled_presets(base: str, num_layers: int) -> dict[str, dict[str | int, str]]:
    """Every method's presets for a model of ``num_layers`` decoder layers, derived from the presets of
    family ``base`` (``qwen2_vl``) as those were derived (docs/methods.md, "Presets for a new depth"):

    - the default method's table (V2Drop's, shared by random): ``base``'s layers scaled to the depth, its
      later ratios kept, the first-stage ratio solved (to 0.01) so that the layer-averaged vision fraction is
      closest to the budget's (192 -> 1/3, 128 -> 2/9 of 576; ``default`` -> what ``base``'s default keeps on
      its own depth);
    - one-stage methods (FastV, DART): one stage at layer 2 matched to that target count, by each one's count;
    - other multi-stage methods (PyramidDrop): three stages s, 2s, 3s matched to the new V2Drop schedule's
      count, by each one's count.
    Returns ``{method: {budget: schedule text}}`` for every registered method with a table for ``base``
    (budgets of the reference table only; a method's own extra keys such as ``paper`` are not derived).
    """
    reference = get_method(DEFAULT_METHOD)
    tokens, base_layers = PRESET_SHAPES[base]
    out: dict[str, dict[str | int, str]] = {}
    derived = [(name, spec) for name, spec in REGISTRY.items()
               if spec.drops and not spec.pre_llm and base in spec.presets]
    for name, _ in derived:
        out[name] = {}
    for budget, text in reference.presets[base].items():
        sched = DropSchedule.parse(text)
        target = budget if isinstance(budget, int) else sched.average_tokens(tokens, base_layers)
        layers = _scale_layers(sched, num_layers, base_layers)
        rest = layers.stages[1:]
        fits = [DropSchedule(((layers.layers[0], r / 100), *rest)) for r in range(1, 101)]
        v2 = min(fits, key=lambda f: abs(f.average_tokens(tokens, num_layers) - target))
        for name, spec in derived:
            if spec.presets is reference.presets:
                fit = v2
            elif spec.multi_stage:
                fit = pdrop_for(v2.average_tokens(tokens, num_layers), tokens, num_layers, method=name)
            else:
                fit = single_stage_for(target, tokens, num_layers, method=name)
            out[name][budget] = str(fit)
    return out


def _scale_layers(schedule: DropSchedule, num_layers: int, ref_layers: int) -> DropSchedule:
    stages, prev = [], 0
    for layer, ratio in schedule.stages:
        scaled = min(max(round(layer * num_layers / ref_layers), prev + 1), num_layers - 1)
        if scaled > prev:
            stages.append((scaled, ratio))
            prev = scaled
    return DropSchedule(tuple(stages))


def fitted_preset(family: str, budget: int | str, method: str, num_layers: int | None,
                  patches: int | None = None) -> tuple[DropSchedule, bool]:
    """``method``'s preset for ``budget``; on a model shallower than the one the presets were made for
    (32 layers for LLaVA, 28 for Qwen2-VL, 36 for Qwen3-VL), the preset scaled to ``num_layers`` by
    :func:`scaled_schedule`, so that every method still spends the same layer-averaged count. A pre-LLM
    preset (VisionZip's counts per 576-patch crop) scales instead to the encoder's ``patches`` per crop
    (``Method.fit_pre_llm``). Returns (schedule, scaled)."""
    schedule = DropSchedule.preset(family, budget, method=method)
    spec = get_method(method)
    if spec.pre_llm:
        if patches is None or schedule.pre_llm is None:
            return schedule, False
        fitted = spec.fit_pre_llm(schedule.pre_llm, patches)
        return DropSchedule(((0, fitted),)), fitted != schedule.pre_llm
    if num_layers is None or num_layers >= PRESET_SHAPES[preset_family(family)][1]:
        return schedule, False
    return scaled_schedule(preset_family(family), budget, method, num_layers), True


def preset_table(family: str, method: str = DEFAULT_METHOD) -> dict[str | int, str]:
    """Budget -> schedule text of ``method``'s presets for ``family`` (ValueError for unknown names)."""
    return dict(get_method(method).presets.get(preset_family(family), {}))


def preset_text(family: str, budget: int | str, method: str = "") -> str:
    """The schedule text of ``method``'s preset (``""``: the default method) for ``family`` at ``budget``;
    ValueError naming the known budgets."""
    method = method or DEFAULT_METHOD
    table = preset_table(family, method)
    key = _budget_key(budget)
    if key not in table:
        known = ", ".join(str(k) for k in table) or "none"
        shared = "" if preset_family(family) == family else f" (its preset table is {preset_family(family)}'s)"
        raise ValueError(f"no preset for budget {budget!r} in family {family!r}{shared} for method "
                         f"{method}; known budgets: {known}")
    return table[key]


def _budget_key(budget: int | str) -> int | str:
    if isinstance(budget, str) and budget.strip().lstrip("-").isdigit():
        return int(budget)
    return budget


install_preset_lookup(preset_text)
