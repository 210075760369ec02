"""DropSchedule parsing, presets, validation and the token arithmetic."""

import pytest

from v2drop_eval import DropSchedule
from v2drop_eval.schedule import kept_count


def test_parse_and_str_roundtrip():
    s = DropSchedule.parse("3:0.5/17:0.3/22:0")
    assert s.stages == ((3, 0.5), (17, 0.3), (22, 0.0))
    assert str(s) == "3:0.5/17:0.3/22:0"
    assert DropSchedule.parse(str(s)) == s
    assert DropSchedule.parse("none").is_empty and DropSchedule.parse("").is_empty


@pytest.mark.parametrize(
    "budget,tokens,average",
    [(192, [576] * 3 + [288] * 14 + [86] * 5 + [0] * 10, 193.4), (128, None, 130.7), (64, None, 66.4)],
)
def test_llava_presets_give_published_averages(budget, tokens, average):
    s = DropSchedule.preset("llava", budget)
    if tokens:
        assert s.tokens_per_layer(576, 32) == tokens
    assert s.average_tokens(576, 32) == pytest.approx(average, abs=0.05)


def test_qwen_presets_and_fastv_presets():
    assert str(DropSchedule.preset("qwen2_vl", "default")) == "3:0.25/16:0.05/22:0"
    assert DropSchedule.preset("qwen2_vl", 192).average_tokens(576, 28) / 576 == pytest.approx(1 / 3, abs=0.005)
    assert DropSchedule.preset("qwen2_vl", 128).average_tokens(576, 28) / 576 == pytest.approx(2 / 9, abs=0.005)
    assert DropSchedule.preset("qwen2_5_vl", "128") == DropSchedule.preset("qwen2_vl", 128)
    for budget in (192, 128, 64):
        fastv = DropSchedule.preset("llava", budget, method="fastv")
        assert len(fastv.stages) == 1 and fastv.layers == (2,)
        assert fastv.average_tokens(576, 32) == pytest.approx(budget, abs=1)


def _derived_presets(depth: int, layers: tuple[int, int, int] = (3, 16, 22)) -> dict[int, str]:
    """The derivation written above ``PRESETS`` in methods/v2drop.py, for a decoder ``depth`` layers deep:
    the given layers, the LLaVA preset's second-stage ratio, and the first-stage ratio (to 0.01) whose
    mean kept fraction over the layers is closest to 1/3 (budget 192) and 2/9 (budget 128)."""
    from fractions import Fraction

    l1, l2, l3 = layers
    out = {}
    for budget, target in ((192, Fraction(1, 3)), (128, Fraction(2, 9))):
        r2 = DropSchedule.preset("llava", budget).stages[1][1]
        second = Fraction(repr(r2))
        means = {Fraction(k, 100): (l1 + (l2 - l1) * Fraction(k, 100) * (1 + (l3 - l2) * second / (l2 - l1))) / depth
                 for k in range(1, 101)}
        r1 = min(means, key=lambda r: abs(means[r] - target))
        out[budget] = str(DropSchedule(((l1, float(r1)), (l2, r2), (l3, 0.0))))
    return out


# Decoder depths read from the checkpoints' configs: Qwen2-VL-7B 28; InternVL3-8B-hf text_config (Qwen2.5-7B) 28.
@pytest.mark.parametrize(("family", "depth"), [("qwen2_vl", 28), ("qwen2_5_vl", 28), ("internvl", 28)])
def test_presets_are_the_depth_derivation(family, depth):
    for budget, text in _derived_presets(depth).items():
        assert str(DropSchedule.preset(family, budget)) == text
    assert str(DropSchedule.preset(family, "default")) == "3:0.25/16:0.05/22:0"


def test_derivation_depends_on_depth():
    # A deeper decoder (e.g. 36 layers) gets other first-stage ratios: the shared table holds for 28 only.
    assert _derived_presets(36) != _derived_presets(28)
    assert _derived_presets(28) == {192: "3:0.43/16:0.3/22:0", 128: "3:0.22/16:0.25/22:0"}


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
    from v2drop_eval.families import FAMILY_NAMES

    assert {"llava", "llava_hf", "qwen2_5_vl", "qwen2_vl", "internvl", "internvl_hf"} <= set(FAMILY_NAMES)
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
