"""The embedded demo: deterministic data, the shipped models load and see, keep ratio 1.0 changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from v2drop_eval import attach  # noqa: E402
from v2drop_eval.demo import TASKS, TASKS_DIR, model_path, paths  # noqa: E402
from v2drop_eval.demo.data import GRID, TEST_SIZE, make_item, make_split  # noqa: E402

N_ITEMS = 60  # a test subset: enough to tell 90% from chance, a few seconds on a CPU


def _load(family: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    path = model_path(family)
    # The models ship with the package: a missing one is a failure, not a skip.
    assert (path / "model.safetensors").exists(), f"demo model missing: {path} (make train-demo)"
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def loaded(request):
    model, processor = _load(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def subset():
    return make_split("test", N_ITEMS)


def _generate(model, processor, items) -> list[str]:
    """Greedy generation one item at a time, the way lmms-eval's models call ``generate``."""
    from v2drop_eval.demo.train import chat_messages

    out = []
    for it in items:
        text = processor.apply_chat_template(chat_messages(it, answer=False), tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[it.image], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        out.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def test_paths_json():
    res = subprocess.run([sys.executable, "-m", "v2drop_eval.demo", "paths"], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout)
    assert got == paths()
    assert set(got) == {"llava", "qwen2_vl", "include_path", "tasks"}
    assert got["tasks"] == TASKS
    assert (TASKS_DIR / "v2drop_demo_vqa.yaml").exists()


def test_data_is_deterministic():
    a, b = make_item(0, "test", 7), make_item(0, "test", 7)
    assert (a.question, a.answer, a.objects, a.target) == (b.question, b.answer, b.objects, b.target)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_item(0, "train", 7).question != a.question or make_item(0, "train", 7).objects != a.objects


def test_shipped_test_split_matches_the_generator():
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files={"test": str(TASKS_DIR / "v2drop_demo_vqa_test.parquet")}
    )["test"]
    assert len(ds) == TEST_SIZE
    for i in (0, 1, 2, 150, TEST_SIZE - 1):
        item = make_item(0, "test", i)
        assert (ds[i]["question"], ds[i]["answer"], ds[i]["target"]) == (item.question, item.answer, item.target)
        assert np.array_equal(np.asarray(ds[i]["image"].convert("RGB")), np.asarray(item.image))


def test_split_properties(subset):
    for it in make_split("test", TEST_SIZE):
        assert it.image.size == (224, 224)
        assert 1 <= len(it.objects) <= 5  # at most 5 of 64 cells hold anything
        assert it.target == -1 or 0 <= it.target < GRID * GRID
    answers = [it.answer for it in make_split("test", TEST_SIZE) if it.qtype == "exists"]
    assert answers.count("yes") == answers.count("no")


def test_model_shapes(loaded):
    family, model, processor = loaded
    cfg = model.config
    assert cfg.text_config.num_hidden_layers >= 8
    it = make_item(0, "test", 0)
    from v2drop_eval.demo.train import chat_messages

    text = processor.apply_chat_template(chat_messages(it, answer=False), tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[it.image], return_tensors="pt")["input_ids"]
    assert int((ids == cfg.image_token_id).sum()) == 64


# The target: at least 90% unpruned (on this subset of the test split).
MIN_ACCURACY = 0.9


def test_demo_models_score(loaded, subset):
    family, model, processor = loaded
    preds = _generate(model, processor, subset)
    acc = sum(p == it.answer for p, it in zip(preds, subset, strict=True)) / len(subset)
    assert acc >= MIN_ACCURACY, f"{family}: {acc:.3f} on {len(subset)} test items"


def test_keep_ratio_one_changes_nothing(loaded, subset):
    family, model, processor = loaded
    items = subset[:12]
    plain = _generate(model, processor, items)
    for method in ("v2drop", "random", "none"):
        with attach(model, "2:1.0", method=method):
            assert _generate(model, processor, items) == plain, method
    with attach(model, "2:1.0", method="fastv"):
        assert _generate(model, processor, items) == plain


@pytest.mark.slow
def test_demo_config_short_run(tmp_path):
    """configs/demo.yaml through the real sweep runner: a few points on a dozen items, then the tables."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "v2drop_eval.cli", "sweep", "configs/demo.yaml", "--output", str(out), "--limit", "12",
           "--only", "*__none", "--only", "demo_llava__v2drop__s2-t1-*"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 points" in proc.stdout + proc.stderr
    from v2drop_eval.cli import main

    assert main(["tables", str(out)]) == 1  # a subset of the grid (--only): the rest named as missing
    assert main(["tables", str(out), "--allow-missing"]) == 0
    acc = (out / "tables" / "accuracy.csv").read_text()
    assert "demo_llava__none" in acc and "demo_qwen2_vl__none" in acc and "demo_llava__v2drop__s2-t1" in acc
    rows = [json.loads(line) for line in next((out / "demo_llava__none").rglob("*_v2drop_samples.jsonl"))
            .read_text().splitlines()]
    assert len(rows) == 12 and all(r["vision_tokens"] == GRID * GRID and r["n_objects"] >= 1 for r in rows)


def test_adaptive_probe_runs(loaded):
    from v2drop_eval.demo.probe import probe

    family = loaded[0]
    out = probe(family, layer=2, items=6, thresholds=(0.0, 1.0))
    assert out["mean_kept"]["text-mean t0"] == 64  # threshold 0 keeps everything
    assert set(out["corr_with_objects"]) == {"text-mean t0", "text-mean t1", "mass 50%", "mass 80%"}
    assert all(0 < k <= 64 for k in out["mean_kept"].values())


def test_fast_patch_embed_is_the_same_product():
    """The trainer's linear patch embedding (a speed-up) gives Qwen2-VL's Conv3d result."""
    from v2drop_eval.demo.train import _fast_patch_embed, build_model, build_tokenizer

    model = build_model("qwen2_vl", build_tokenizer("qwen2_vl"), layers=1, hidden=64)
    embed = model.model.visual.patch_embed
    x = torch.randn(20, embed.proj.weight[0].numel())
    with torch.no_grad():
        conv = embed(x)
        _fast_patch_embed(model, "qwen2_vl")
        fast = embed(x)
    assert "forward" in vars(embed)  # the instance method was replaced
    torch.testing.assert_close(fast, conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_freeze_vision_tower_leaves_the_projector_training(family):
    """``--freeze-vision``: after phase 1 only the tower's output module (projector / merger) still learns."""
    from v2drop_eval.demo.train import (
        _image_features,
        _vision_output_module,
        _vision_tower,
        build_model,
        build_processor,
        freeze_vision_tower,
    )

    processor = build_processor(family)
    model = build_model(family, processor.tokenizer, layers=1, hidden=64)
    assert freeze_vision_tower(model, family) > 0
    captured = {}
    _vision_output_module(model, family).register_forward_hook(lambda m, a, o: captured.setdefault("feat", o))
    pixels = processor.image_processor([make_item(0, "train", 0).image], return_tensors="pt")
    _image_features(model, family, dict(pixels))
    captured["feat"].pow(2).sum().backward()
    out = {id(p) for p in _vision_output_module(model, family).parameters()}
    tower = _vision_tower(model, family)
    assert all(p.grad is not None for p in tower.parameters() if id(p) in out)
    assert all(p.grad is None and not p.requires_grad for p in tower.parameters() if id(p) not in out)


def test_gather_loss_targets_the_question_key_words():
    """``--gather-layer``: the first hop looks at the words naming the object (and nowhere else scores 0)."""
    from v2drop_eval.demo.train import _gather_loss, question_keys

    assert question_keys("what color is the triangle?") == ["triangle"]
    assert question_keys("what shape is the red object?") == ["red"]
    assert question_keys("is there a blue circle?") == ["blue", "circle"]
    ids = torch.tensor([[5, 7, 8, 9, 3, 4]])  # ... "blue"=7 "circle"=8 "?"=9 "assistant"=3, answer=4
    ans = torch.tensor([[False, False, False, False, False, True]])
    attn = torch.zeros(1, 2, 6, 6)
    attn[0, 0, 4, 1] = attn[0, 0, 4, 2] = 0.5  # head 0 splits its attention over both key words
    loss = _gather_loss((attn,), 0, 0, ids, ans, [[[7, 8]]])
    assert loss.item() < 1e-5
    attn[0, 0, 4, 1:3] = 0.0
    attn[0, 0, 4, 0] = 1.0
    assert _gather_loss((attn,), 0, 0, ids, ans, [[[7, 8]]]).item() > 10


def test_init_decoder_from_copies_the_llava_decoder():
    """``--init-from``: a Qwen2-VL model starts from the shipped LLaVA model's decoder, words by string."""
    from transformers import AutoTokenizer

    from v2drop_eval.demo.train import build_model, build_tokenizer, init_decoder_from

    tok = build_tokenizer("qwen2_vl")
    model = build_model("qwen2_vl", tok)
    out = init_decoder_from(model, tok, model_path("llava"))
    src, _ = _load("llava")
    src_lm, lm = src.model.language_model, model.model.language_model
    assert out["init_tensors"] == len(src_lm.state_dict()) - 1  # all but the embedding, copied whole
    torch.testing.assert_close(lm.layers[3].self_attn.q_proj.weight, src_lm.layers[3].self_attn.q_proj.weight)
    src_tok = AutoTokenizer.from_pretrained(model_path("llava"))
    for word, src_word in (("red", "red"), ("triangle", "triangle"), ("<|im_start|>", "<s>")):
        torch.testing.assert_close(lm.embed_tokens.weight[tok.convert_tokens_to_ids(word)],
                                   src_lm.embed_tokens.weight[src_tok.convert_tokens_to_ids(src_word)])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(gather_layer=3), ValueError, "gather_layer must be -1"),
    (dict(gather_layer=-2), ValueError, "gather_layer must be -1"),
    (dict(gather_layer=1, pointer_weight=0), ValueError, "gather_layer must be -1"),
    (dict(vision_target=1.5), ValueError, "vision_target is an object accuracy in \\(0, 1\\], got 1.5"),
    (dict(init_from="/nonexistent"), FileNotFoundError, "init_from must be a trained demo model folder.*/nonexistent"),
])
def test_bad_training_options_are_refused_before_training(kwargs, error, match, tmp_path):
    from v2drop_eval.demo.train import train

    with pytest.raises(error, match=match):
        train("qwen2_vl", tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
