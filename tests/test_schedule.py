"""DropSchedule parsing, presets, validation and the token arithmetic."""

import pytest

from v2drop_eval import DropSchedule
from v2drop_eval.engine.schedule import kept_count
from v2drop_eval.methods.presets import depth_scaled_presets, pdrop_for, preset_table, single_stage_for


def test_parse_and_str_roundtrip():
    s = DropSchedule.parse("3:0.5/17:0.3/22:0")
    assert s.stages == ((3, 0.5), (17, 0.3), (22, 0.0))
    assert str(s) == "3:0.5/17:0.3/22:0"
    assert DropSchedule.parse(str(s)) == s
    assert DropSchedule.parse("none").is_empty and DropSchedule.parse("").is_empty


@pytest.mark.parametrize(
    "budget,tokens,average,exact",
    [(192, [576] * 3 + [288] * 14 + [86] * 5 + [1] * 10, 193.75, 193.4), (128, None, 131.0, 130.7),
     (64, None, 66.7, 66.4)],
)
def test_llava_presets_give_published_averages(budget, tokens, average, exact):
    """V2Drop's own count keeps one token at the ':0' stage (max(1, int(alive x r))); with exact_counts
    (or zero_drops_all) it keeps none, the paper's 193 / 131 / 66 (design.md §1)."""
    s = DropSchedule.preset("llava", budget)
    if tokens:
        assert s.tokens_per_layer(576, 32) == tokens
    assert s.average_tokens(576, 32) == pytest.approx(average, abs=0.05)
    for options in (["exact_counts"], ["zero_drops_all"]):
        assert s.average_tokens(576, 32, options=options) == pytest.approx(exact, abs=0.05)


def test_qwen_presets_and_fastv_presets():
    assert str(DropSchedule.preset("qwen2_vl", "default")) == "3:0.25/16:0.05/22:0"
    assert DropSchedule.preset("qwen2_vl", 192).average_tokens(576, 28) / 576 == pytest.approx(1 / 3, abs=0.005)
    assert DropSchedule.preset("qwen2_vl", 128).average_tokens(576, 28) / 576 == pytest.approx(2 / 9, abs=0.005)
    assert DropSchedule.preset("qwen2_5_vl", "128") == DropSchedule.preset("qwen2_vl", 128)
    for budget in (192, 128, 64):
        fastv = DropSchedule.preset("llava", budget, method="fastv")
        assert len(fastv.stages) == 1 and fastv.layers == (2,)
        assert fastv.average_tokens(576, 32) == pytest.approx(budget, abs=1)


# Decoder depths read from the checkpoints' configs: Qwen2-VL-7B 28; InternVL3-8B-hf text_config (Qwen2.5-7B) 28;
# Qwen3-VL-8B 36. InternVL's 28 layers give the Qwen2-VL table, which it therefore shares.
@pytest.mark.parametrize(("family", "layers"), [("qwen2_vl", 28), ("qwen2_5_vl", 28), ("internvl", 28), ("qwen3_vl", 36)])
def test_depth_scaled_presets_are_the_committed_tables(family, layers):
    """The derivation reproduces the Qwen2-VL tables on their own 28 layers, and gives each family's own."""
    derived = depth_scaled_presets("qwen2_vl", layers)
    for method in ("v2drop", "fastv", "pdrop", "dart"):
        committed = {str(k): v for k, v in preset_table(family, method).items() if k != "paper"}
        assert committed == {str(k): v for k, v in derived[method].items()}, method


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_llava_presets_of_the_other_methods_are_fitted_with_their_own_counts(budget):
    """PyramidDrop: s, 2s, 3s within one token of V2Drop's average, lambda closest to 0.5; FastV and DART:
    one stage at layer 2 closest to the budget, each counted by its own formula."""
    target = DropSchedule.preset("llava", budget).average_tokens(576, 32)
    assert DropSchedule.preset("llava", budget, method="pdrop") == pdrop_for(target, 576, 32, method="pdrop")
    for method in ("fastv", "dart"):
        assert DropSchedule.preset("llava", budget, method=method) == single_stage_for(budget, 576, 32, method=method)


def test_derivation_depends_on_depth():
    # A deeper decoder (e.g. 36 layers) gets other ratios: a shared table holds for its own depth only.
    assert depth_scaled_presets("qwen2_vl", 36)["v2drop"] != depth_scaled_presets("qwen2_vl", 28)["v2drop"]


def test_qwen3_vl_presets_fractions_and_deepstack():
    for budget, fraction in ((192, 1 / 3), (128, 2 / 9)):
        for method in ("v2drop", "fastv", "pdrop"):
            s = DropSchedule.preset("qwen3_vl", budget, method=method)
            assert s.average_tokens(576, 36) / 576 == pytest.approx(fraction, abs=0.005), (method, budget)
    # V2Drop's stages start after Qwen3-VL-8B's DeepStack layers (0..2); FastV/DART at layer 2 is inside them.
    assert DropSchedule.preset("qwen3_vl", "default").layers == (4, 21, 28)
    assert DropSchedule.preset("qwen3_vl", 128, method="fastv").layers == (2,)


def test_kept_count_is_exact_decimal_floor():
    assert kept_count(100, 0.29) == 29  # 100 * 0.29 == 28.999999999999996 in floats
    assert kept_count(576, 0.28) == 161 and kept_count(161, 0.25) == 40 and kept_count(5, 0) == 0


@pytest.mark.parametrize(
    "text,match",
    [
        ("0:0.5", "layers must be >= 1"),
        ("3:0.5/3:0.2", "strictly increasing"),
        ("5:0.5/3:0.2", "strictly increasing"),
        ("3:1.5", r"keep ratio 1.5 .* \[0, 1\]"),
        ("3:-0.1", r"\[0, 1\]"),
        ("3:nan", r"\[0, 1\]"),
        ("3-0.5", "layer:keep_ratio"),
        ("3:0.5,17:0.3", "layer:keep_ratio"),
        ("x:0.5", "layer:keep_ratio"),
    ],
)
def test_bad_schedules_name_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        DropSchedule.parse(text)


def test_depth_and_preset_errors():
    with pytest.raises(ValueError, match=r"drop layer 40 is past the model's depth: it has 32 .* 1\.\.31"):
        DropSchedule.parse("3:0.5/40:0").tokens_per_layer(576, 32)
    from v2drop_eval.engine.families import FAMILY_NAMES

    assert {"llava", "llava_hf", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "internvl", "internvl_hf"} <= set(FAMILY_NAMES)
    with pytest.raises(ValueError, match=f"unknown model family 'blip'; known families: {', '.join(FAMILY_NAMES)}$"):
        DropSchedule.preset("blip", 128)
    with pytest.raises(ValueError, match="known budgets: 192, 128, 64"):
        DropSchedule.preset("llava", 100)
    with pytest.raises(ValueError, match="known budgets: default, 192, 128"):
        DropSchedule.preset("qwen2_vl", 64)


def test_ratios_keep_every_digit():
    """A ratio runs, prints and names its point exactly as written (not rounded to 6 digits)."""
    sched = DropSchedule.parse("2:0.1736112")
    assert str(sched) == "2:0.1736112" and sched.slug() == "2-0.1736112"
    assert sched.tokens_per_layer(576, 28)[2] == 100  # 0.173611 would keep 99
    assert str(DropSchedule.parse("3:0.5/17:0.30/22:0.0")) == "3:0.5/17:0.3/22:0"
    assert str(DropSchedule.parse("3:t0.8:0.05:1")) == "3:t0.8:0.05:1"
    assert str(DropSchedule.parse("3:t1.23456789:0.1234567:1")) == "3:t1.23456789:0.1234567:1"


@pytest.mark.parametrize("text, match", [
    ("3:1e-400", r"'1e-400' is too small to represent: it would run as 0"),
    ("3:0.12345678901234567891", r"cannot be represented exactly: it would run as 0.12345678901234568"),
    ("3:t1:1e-999:1", "too small to represent"),
])
def test_ratios_that_would_change_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        DropSchedule.parse(text)


def test_onevision_takes_the_qwen2_vl_derivation():
    """LLaVA-OneVision-7B's decoder has Qwen2-VL-7B's 28 layers; the derivation (layers 3/16/22, the LLaVA
    second-stage ratio, the first solved so the mean vision share over 28 layers is closest to the LLaVA
    budget's share of 576) depends on the depth alone, so it gives the same table (docs/methods.md)."""
    from v2drop_eval.engine.families import get_family

    assert get_family("llava_onevision").presets == "qwen2_vl"
    for budget, second in ((192, 0.3), (128, 0.25)):
        best = min((r / 100 for r in range(1, 100)),
                   key=lambda r1, r2=second, b=budget: abs((3 + 13 * r1 + 6 * r1 * r2) / 28 - b / 576))
        assert str(DropSchedule.preset("llava_onevision", budget)) == f"3:{best:g}/16:{second:g}/22:0"
        assert DropSchedule.preset("llava_onevision", budget) == DropSchedule.preset("qwen2_vl", budget)
