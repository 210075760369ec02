"""Sweep configs, grid expansion and the resumable runner (fake runners), plus the real smoke sweep."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweep_fakes import install_fake_lmms_eval

from v2drop_eval.cli import main, select_points
from v2drop_eval.sweep.config import ConfigError, expand, load_config, parse_config
from v2drop_eval.sweep.layout import is_done
from v2drop_eval.sweep.runner import run_sweep

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def base_config(**over):
    cfg = {
        "name": "t",
        "models": [{"name": "m7b", "family": "llava", "pretrained": "llava-hf/llava-1.5-7b-hf", "num_layers": 32}],
        "methods": ["none", "v2drop", "random", "fastv"],
        "budgets": [192, 128],
        "tasks": ["gqa", "pope"],
    }
    cfg.update(over)
    return cfg


def parse(raw, **kw):
    return parse_config(raw, read_layers=False, **kw)


# -- configs and expansion ---------------------------------------------------------------------------
def test_expand_ids_and_args():
    cfg = parse(base_config(metrics=["l2", "cosine"]))
    ids = [p.id for p in expand(cfg)]
    assert ids == [
        "m7b__none",
        "m7b__v2drop__b192__l2", "m7b__v2drop__b192__cosine", "m7b__v2drop__b128__l2", "m7b__v2drop__b128__cosine",
        "m7b__random__b192", "m7b__random__b128",
        "m7b__fastv__b192", "m7b__fastv__b128",
    ]
    by_id = {p.id: p for p in expand(cfg)}
    assert by_id["m7b__none"].model_args() == "pretrained=llava-hf/llava-1.5-7b-hf,method=none"
    assert by_id["m7b__v2drop__b128__cosine"].model_args() == (
        "pretrained=llava-hf/llava-1.5-7b-hf,method=v2drop,budget=128,metric=cosine")
    assert by_id["m7b__random__b192"].model_args().endswith("method=random,budget=192,seed=0")
    assert by_id["m7b__fastv__b128"].model_args().endswith("method=fastv,budget=128")
    cmd = cfg.command(by_id["m7b__fastv__b128"], "/o")
    assert cmd[1:] == ["-m", "lmms_eval", "--model", "v2drop_llava", "--model_args",
                       "pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=128", "--tasks", "gqa,pope",
                       "--batch_size", "1", "--output_path", "/o", "--log_samples"]


def test_expand_schedules_and_seeds():
    cfg = parse(base_config(
        methods=["v2drop", "random"], budgets=[], seeds=[0, 1],
        schedules=["3:0.5/17:0.3/22:0", {"layers": [[4, 14, 30], [2, 16, 21]], "keep_ratios": [[0.5, 0.3, 0.0]]}],
        lmms_eval_args=["--log_samples"], limit=8, num_processes=2,
        models=[{"name": "m", "family": "llava", "pretrained": "x", "model_args": {"device_map": "cpu"}}],
    ))
    ids = [p.id for p in expand(cfg)]
    assert ids[:3] == ["m__v2drop__s3-0.5_17-0.3_22-0__l2", "m__v2drop__s4-0.5_14-0.3_30-0__l2",
                       "m__v2drop__s2-0.5_16-0.3_21-0__l2"]
    assert "m__random__s2-0.5_16-0.3_21-0" in ids
    adaptive = parse(base_config(methods=["v2drop"], budgets=[], schedules=["3:t1.0:0.1:0.6/22:0"]))
    assert [p.id for p in expand(adaptive)] == ["m7b__v2drop__s3-t1-0.1-0.6_22-0__l2"] and "m__random__s2-0.5_16-0.3_21-0__seed1" in ids
    p = expand(cfg)[0]
    assert p.model_args() == "pretrained=x,method=v2drop,schedule=3:0.5/17:0.3/22:0,metric=l2,device_map=cpu"
    cmd = cfg.command(p, "/o")
    assert cmd[1:8] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m", "lmms_eval"]
    assert cmd[-3:] == ["--log_samples", "--limit", "8"]  # given in lmms_eval_args too: once


def test_encoder_schedules_and_visionzip_points():
    """encoder_schedules combine with every setting of a method (``__e<slug>`` in the id, ``encoder_schedule=``
    in the model args); VisionZip takes budgets and refuses an encoder schedule, with its location named."""
    cfg = parse(base_config(methods=["none", "v2drop", {"method": "visionzip", "encoder_schedules": ["none"]}],
                            budgets=[128], encoder_schedules=["none", "12:0.5/18:0.5"]))
    by_id = {p.id: p for p in expand(cfg)}
    assert list(by_id) == ["m7b__none", "m7b__none__e12-0.5_18-0.5", "m7b__v2drop__b128__l2",
                           "m7b__v2drop__b128__e12-0.5_18-0.5__l2", "m7b__visionzip__b128"]
    assert by_id["m7b__none__e12-0.5_18-0.5"].model_args().endswith("method=none,encoder_schedule=12:0.5/18:0.5")
    assert by_id["m7b__visionzip__b128"].model_args().endswith("method=visionzip,budget=128")
    assert by_id["m7b__v2drop__b128__e12-0.5_18-0.5__l2"].to_dict()["encoder_schedule"] == "12:0.5/18:0.5"
    with pytest.raises(ConfigError, match="method visionzip: encoder_schedule=12:0.5 does not combine"):
        parse(base_config(methods=["visionzip"], budgets=[128], encoder_schedules=["12:0.5"]))
    with pytest.raises(ConfigError, match="encoder_schedules: encoder_schedule=3:t1:0.1:0.5: encoder stages"):
        parse(base_config(encoder_schedules=["3:t1:0.1:0.5"]))


def test_shipped_configs_are_valid():
    expected = {"llava15_7b": 23, "qwen2vl_7b": 14, "qwen3vl_8b": 9, "ablation_layers": 7, "ablation_metric": 4}
    for name, n in expected.items():
        cfg = load_config(CONFIGS / f"{name}.yaml")
        points = expand(cfg)
        assert len(points) == n, name
        assert sum(p.method == "none" and p.encoder_schedule is None for p in points) == 1
    layers = expand(load_config(CONFIGS / "ablation_layers.yaml"))
    assert {p.schedule for p in layers if p.schedule} == {
        "4:0.5/14:0.3/30:0", "3:0.5/14:0.3/29:0", "3:0.5/15:0.3/27:0", "3:0.5/16:0.3/24:0",
        "3:0.5/17:0.3/22:0", "2:0.5/16:0.3/21:0"}
    metric = expand(load_config(CONFIGS / "ablation_metric.yaml"))
    assert {p.metric for p in metric if p.metric} == {"l1", "l2", "cosine"}
    qwen = expand(load_config(CONFIGS / "qwen2vl_7b.yaml"))
    assert [p.id for p in qwen] == ["qwen2vl_7b__none", "qwen2vl_7b__none__e8-0.5_16-0.5",
                                    "qwen2vl_7b__v2drop__b192__l2", "qwen2vl_7b__v2drop__b128__l2",
                                    "qwen2vl_7b__v2drop__b192__e8-0.5_16-0.5__l2",
                                    "qwen2vl_7b__v2drop__b128__e8-0.5_16-0.5__l2",
                                    "qwen2vl_7b__fastv__b192", "qwen2vl_7b__fastv__b128",
                                    "qwen2vl_7b__pdrop__b192", "qwen2vl_7b__pdrop__b128",
                                    "qwen2vl_7b__dart__b192", "qwen2vl_7b__dart__b128",
                                    "qwen2vl_7b__sparsevlm__b192", "qwen2vl_7b__sparsevlm__b128"]  # visionzip: noted
    assert any("skips method visionzip" in n for n in load_config(CONFIGS / "qwen2vl_7b.yaml").notes)
    llava = expand(load_config(CONFIGS / "llava15_7b.yaml"))
    assert {p.id for p in llava} >= {"llava15_7b__visionzip__b128", "llava15_7b__none__e12-0.5_18-0.5"}
    assert "method=pdrop,budget=128" in qwen[-5].model_args() and "method=dart,budget=192" in qwen[-4].model_args()
    assert "method=sparsevlm,budget=128" in qwen[-1].model_args()
    smoke = load_config(CONFIGS / "smoke.yaml")
    assert len(expand(smoke)) >= 4


def test_every_other_method_joins_through_the_wildcard():
    """``{method: "*"}``: every registered dropping method the list does not name, on that entry's grid, so a
    method registered later joins the demo sweeps without an edit; one that refuses the grid is left out."""
    from v2drop_eval.methods import REGISTRY

    droppers = [m for m, spec in REGISTRY.items() if spec.drops]
    # a method that drops before the LLM (VisionZip) cannot run a decoder stage: brought in, then left out
    before_llm = [m for m in droppers if REGISTRY[m].pre_llm]
    assert before_llm == ["visionzip"]
    cfg = parse(base_config(budgets=[], methods=["none", {"method": "v2drop", "schedules": ["2:0.5"]},
                                                 {"method": "*", "schedules": ["2:0.25", "2:0.125"]}]))
    joined = [m for m in droppers if m != "v2drop"]
    kept = [m for m in joined if m not in before_llm]
    assert cfg.methods == ["none", "v2drop", *kept] and cfg.joined == joined
    assert len(cfg.notes) == 1 and "method visionzip (from '*') left out" in cfg.notes[0]
    ids = [p.id for p in expand(cfg)]
    assert ids[:2] == ["m7b__none", "m7b__v2drop__s2-0.5__l2"]
    assert {p.method for p in expand(cfg)} == {"none", "v2drop", *kept}
    assert sum(p.method == joined[0] for p in expand(cfg)) == 2  # the wildcard's grid, not v2drop's
    # a method named after the wildcard is not joined twice; it keeps its own grid
    cfg = parse(base_config(budgets=[], methods=[{"method": "*", "schedules": ["2:0.25"]},
                                                 {"method": "fastv", "schedules": ["2:0.5"]}]))
    assert "fastv" not in cfg.joined and cfg.grid("fastv")["schedules"] == ["2:0.5"]
    # an adaptive stage is only for methods that take them: the joined others are left out, each with a note
    adaptive = [m for m in droppers if REGISTRY[m].adaptive]
    cfg = parse(base_config(budgets=[], methods=["none", {"method": "*", "schedules": ["2:t1:0.05:1"]}]))
    assert cfg.methods == ["none", *adaptive]
    assert len(cfg.notes) == len(droppers) - len(adaptive)
    for m in (m for m in droppers if m not in adaptive):
        (note,) = [n for n in cfg.notes if n.startswith(f"method {m} (from '*') left out")]
        assert m in before_llm or "adaptive stages" in note
    for bad, message in ((["none", "*"], "needs its grid"),
                         ([{"method": "*", "budgets": [192]}, {"method": "*", "budgets": [128]}], "listed twice"),
                         ([{"method": "*", "budgets": [192], "options": [["exact_counts"]]}], "options belong to one")):
        with pytest.raises(ConfigError, match=message):
            parse(base_config(methods=bad))


def test_method_entry_runs_on_the_models_it_names():
    """``models: [...]`` in a method entry (``"*"`` included) limits it to those of the config's models."""
    two = [{"name": "a", "family": "llava", "pretrained": "x", "num_layers": 32},
           {"name": "q", "family": "qwen2_vl", "pretrained": "y", "num_layers": 28}]
    cfg = parse(base_config(models=two, budgets=[], methods=[
        "none", {"method": "v2drop", "schedules": ["2:0.5"], "models": ["a"]},
        {"method": "*", "schedules": ["2:0.25"], "models": ["q"]}]))
    ids = [p.id for p in expand(cfg)]
    assert "a__v2drop__s2-0.5__l2" in ids and not any(i.startswith("q__v2drop") for i in ids)
    assert "q__fastv__s2-0.25" in ids and not any(i.startswith("a__fastv") for i in ids)
    assert {"a__none", "q__none"} <= set(ids)


def test_demo_scenes_config_runs_every_method_at_the_same_counts():
    """configs/demo_scenes.yaml: every registered method, each at about 25% and 12.5% of the vision tokens
    entering layer 2 on every model it lists (SparseVLM's recycled tokens counted; DART's authors' counts
    move in steps of 8, so within 4 tokens). The scenes models are checked against the vqa demo models'
    configs (same families and depth), so the grid is checked without reading their weights."""
    from v2drop_eval.demo import model_path
    from v2drop_eval.demo.train_scenes import TOKENS_PER_SIDE
    from v2drop_eval.engine.schedule import DropSchedule
    from v2drop_eval.methods import REGISTRY

    raw = yaml.safe_load((CONFIGS / "demo_scenes.yaml").read_text())
    tokens = {m["name"]: TOKENS_PER_SIDE[m["family"]] ** 2 for m in raw["models"]}
    for m in raw["models"]:
        m["pretrained"] = str(model_path(m["family"]))
    cfg = parse_config(raw)
    points = expand(cfg)
    runs_on = {m.name: {p.method for p in points if p.model == m} for m in cfg.models}
    assert runs_on == {"scenes_llava": set(REGISTRY), "scenes_qwen2_vl": set(REGISTRY) - {"visionzip"}}
    assert [n for n in cfg.notes if "skips method visionzip" in n], cfg.notes  # no [CLS] in Qwen2-VL's ViT
    for model in cfg.models:
        n = tokens[model.name]
        for share in (0.25, 0.125):
            at = {p.method for p in points if p.model == model and p.schedule and ":t" not in p.schedule
                  and abs(DropSchedule.parse(p.schedule).tokens_per_layer(n, 8, p.method)[2] - share * n) <= 4}
            runs = {p.method for p in points if p.model == model} - {"none"}
            assert at == runs, (model.name, share, runs - at)


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"methods": ["none", "bogus"]}, "unknown method 'bogus'"),
    ({"metrics": ["l3"]}, "unknown metric 'l3'"),
    ({"models": [{"name": "m", "family": "blip", "pretrained": "x"}]}, "unknown family 'blip'"),
    ({"models": [{"name": "m", "family": "llava", "pretrained": "x", "layers": 3}]}, "unknown key 'layers'"),
    ({"budgets": [96]}, "no preset for budget 96"),
    ({"budgets": [], "schedules": ["3:0.5/40:0"]}, "drop layer 40 is past the model's depth"),
    ({"budgets": [], "schedules": ["0:0.5"]}, "drop layer 0 is not allowed"),
    ({"budgets": [], "schedules": ["3:1.5"]}, "keep ratio 1.5"),
    ({"budgets": [], "schedules": ["17:0.5/3:0.2"]}, "strictly increasing"),
    ({"budgets": [], "schedules": ["3-0.5"]}, "is not 'layer:keep_ratio'"),
    ({"budgets": [], "schedules": [{"layers": [[3, 17]], "keep_ratios": [[0.5, 0.3, 0.0]]}]}, "differ in length"),
    ({"budgets": []}, "method 'v2drop' needs at least one budget or schedule"),
    ({"methods": ["none", {"method": "fastv", "schedules": ["2:0.5/3:0"]}]}, "method fastv drops once"),
    ({"methods": [{"method": "fastv", "budget": [1]}]}, "unknown key(s) 'budget'"),
    ({"methods": ["none", "none"]}, "'none' is listed twice"),
    ({"tasks": []}, "at least one lmms-eval task"),
    ({"models": [{"name": "a__b", "family": "llava", "pretrained": "x"}]}, "name 'a__b'"),
    ({"models": [{"name": "m", "family": "llava", "pretrained": "x", "model_args": {"budget": 1}}]},
     "model_args.budget is set by the sweep"),
    ({"lmms_eval_args": ["--tasks", "x"]}, "--tasks is set by the sweep"),
    ({"budgets": [192, 192]}, "names the same point twice"),
    ({"budgets": [], "schedules": ["3:t1.0:0.1:0.6/22:0"]}, "adaptive stages need method v2drop, not 'random'"),
    ({"output": "${V2DROP_TEST_UNSET_VAR}"}, "V2DROP_TEST_UNSET_VAR"),
    ({"methods": [{"method": "v2drop", "options": [["pivots_in_order"]]}]},
     "methods[0].options[0]: option pivots_in_order applies to method=dart only, not method=v2drop"),
    ({"methods": [{"method": "pdrop", "positions": ["kept"]}]},
     "methods[0].positions: positions='kept' is not allowed; allowed: keep, renumber"),
    ({"methods": [{"method": "pdrop", "positions": ["keep", "keep"]}]}, "positions=keep is listed twice"),
    ({"methods": [{"method": "pdrop", "options": ["bogus"]}]}, "methods[0].options[0]: unknown option 'bogus'"),
    ({"methods": [{"method": "pdrop", "options": "exact_counts"}]}, "expected a list of option sets"),
    ({"methods": [{"method": "pdrop", "options": [[], None]}]}, "the option set [] is listed twice"),
    ({"methods": [{"method": "fastv", "models": ["m8b"]}]},
     "methods (fastv): models 'm8b' not in this config; its models: m7b"),
    ({"methods": [{"method": "fastv", "models": []}]}, "methods[0].models: expected at least one model name"),
    ({"methods": [{"method": "fastv", "models": ["m7b", "m7b"]}]}, "model 'm7b' is listed twice"),
])
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ConfigError) as err:
        parse(base_config(**change))
    assert message in str(err.value)


def test_qwen_budget_64_refused():
    raw = base_config(models=[{"name": "q", "family": "qwen2_vl", "pretrained": "x", "num_layers": 28}], budgets=[64])
    with pytest.raises(ConfigError, match="model q, method v2drop, budget 64: no preset for budget 64"):
        parse(raw)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse(base_config(bogus=1, methods=["x"], metrics=["y"]))
    text = str(err.value)
    assert "'bogus'" in text and "'x'" in text and "'y'" in text


def test_depth_from_local_config_and_skip_note(tmp_path):
    from transformers import LlamaConfig, LlavaConfig

    LlavaConfig(text_config=LlamaConfig(num_hidden_layers=6).to_dict()).save_pretrained(tmp_path / "tiny")
    raw = base_config(models=[{"name": "t", "family": "llava", "pretrained": str(tmp_path / "tiny")}], budgets=[192])
    parse_config(raw)  # a budget's preset too deep for the model is scaled to its depth (as the plugin does)
    raw["budgets"], raw["schedules"] = [], ["17:0.3"]
    with pytest.raises(ConfigError, match="drop layer 17 is past the model's depth: it has 6 decoder layers"):
        parse_config(raw)
    raw["models"][0]["pretrained"] = "org/not-in-the-cache"  # a hub id: left to the hub, noted
    cfg = parse_config(raw)
    assert any("depth check skipped" in n for n in cfg.notes)
    raw["models"][0]["pretrained"] = str(tmp_path / "missing")  # a folder: refused, not sent to the hub
    with pytest.raises(ConfigError, match=r"pretrained=.*missing: no such folder") as err:
        parse_config(raw)
    assert "Repo id" not in str(err.value)


def test_env_substitution(monkeypatch):
    monkeypatch.setenv("V2DROP_TEST_ROOT", "/data")
    cfg = parse(base_config(output="${V2DROP_TEST_ROOT}/out", include_path="${V2DROP_TEST_NOPE:-tasks}"))
    assert cfg.output == Path("/data/out") and cfg.include_path == "tasks"


def test_only_filter():
    points = expand(parse(base_config()))
    assert [p.id for p in select_points(points, ["b128"])] == [
        "m7b__v2drop__b128__l2", "m7b__random__b128", "m7b__fastv__b128"]
    assert [p.id for p in select_points(points, ["*__none", "*fastv*192"])] == ["m7b__none", "m7b__fastv__b192"]


# -- runner with a fake lmms-eval ------------------------------------------------------------------
class FakeRunner:
    """Writes lmms-eval-shaped results unless told to fail; records which points ran."""

    def __init__(self, fail=(), no_results=(), missing_task=(), interrupt=()):
        self.calls: list[str] = []
        self.fail, self.no_results, self.missing_task, self.interrupt = fail, no_results, missing_task, interrupt

    def __call__(self, cmd, log_path, env, timeout):
        out = Path(cmd[cmd.index("--output_path") + 1])
        tasks = cmd[cmd.index("--tasks") + 1].split(",")
        margs = cmd[cmd.index("--model_args") + 1]
        self.calls.append(out.name)
        (out / "v2drop_llava").mkdir(parents=True, exist_ok=True)
        (out / "v2drop_llava" / "partial.bin").write_bytes(b"x")
        if any(s in margs for s in self.interrupt):
            raise KeyboardInterrupt
        if any(s in margs for s in self.fail):
            log_path.open("a").write("RuntimeError: out of memory\n")
            return 1
        if any(s in margs for s in self.no_results):
            return 0
        if any(s in margs for s in self.missing_task):
            tasks = tasks[:-1]
        res = {t: {"alias": t, "exact_match,none": 0.5} for t in tasks}
        n = {t: {"original": 2, "effective": 2} for t in tasks}
        (out / "v2drop_llava" / "20250101_000000_results.json").write_text(json.dumps({"results": res, "n-samples": n}))
        (out / "v2drop_llava" / "20250101_000000_v2drop_samples.jsonl").write_text(
            "".join(json.dumps({"task": t, "doc_id": i}) + "\n" for t in tasks for i in range(2)))
        return 0


def small_cfg(tmp_path, **over):
    raw = base_config(methods=["none", "v2drop", "fastv"], budgets=[128], output=str(tmp_path / "sw"))
    return parse({**raw, **over})


def test_run_resume_and_layout(tmp_path):
    cfg = small_cfg(tmp_path)
    points = expand(cfg)
    fake, log = FakeRunner(), io.StringIO()
    report = run_sweep(cfg, points, runner=fake, log=log)
    assert report.ok and [o.status for o in report.outcomes] == ["done"] * 3
    assert fake.calls == [".tmp-" + p.id for p in points]
    out = cfg.output
    assert sorted(x.name for x in out.iterdir()) == sorted(
        [".sweep.lock", "sweep.json", "sweep.origin.json", "sweep.yaml", *(p.id for p in points)])
    meta = json.loads((out / "m7b__v2drop__b128__l2" / "point.json").read_text())
    assert meta["status"] == "ok" and meta["budget"] == 128 and meta["metric"] == "l2"
    assert meta["results_files"] == ["v2drop_llava/20250101_000000_results.json"]
    assert meta["sidecars"] == ["v2drop_llava/20250101_000000_v2drop_samples.jsonl"]
    assert str(out / "m7b__v2drop__b128__l2") in " ".join(meta["command"]) and ".tmp-" not in " ".join(meta["command"])
    text = log.getvalue()
    assert "[1/3] run  m7b__none" in text and "ETA ?" in text and "[3/3] run" in text and "ETA 0:00:0" in text
    status = json.loads((out / "sweep.json").read_text())
    assert {v["status"] for v in status["points"].values()} == {"done"}

    again, log2 = FakeRunner(), io.StringIO()
    report = run_sweep(cfg, points, runner=again, log=log2)
    assert again.calls == [] and [o.status for o in report.outcomes] == ["skipped"] * 3
    assert "3 done already, 0 to run" in log2.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal_plain_lines_in_a_log(tmp_path):
    """A terminal gets tqdm's bar (carriage returns) beside the same lines; a log file only the lines."""
    cfg = small_cfg(tmp_path)
    term = _Terminal()
    assert run_sweep(cfg, expand(cfg), runner=FakeRunner(), log=term).ok
    shown = term.getvalue()
    assert "sweep: 100%" in shown and "3/3" in shown and "\r" in shown and "[3/3] run" in shown
    cfg2 = small_cfg(tmp_path / "b")
    log = io.StringIO()
    assert run_sweep(cfg2, expand(cfg2), runner=FakeRunner(), log=log).ok
    assert "\r" not in log.getvalue() and "sweep:" not in log.getvalue()


def test_failed_points_recorded_and_retried(tmp_path):
    cfg = small_cfg(tmp_path)
    points = expand(cfg)
    fake = FakeRunner(fail=["method=v2drop"], no_results=["method=fastv"])
    log = io.StringIO()
    report = run_sweep(cfg, points, runner=fake, log=log)
    assert [o.status for o in report.outcomes] == ["done", "failed", "failed"]
    assert "exited with status 1" in report.failed[0].error and "out of memory" in report.failed[0].error
    assert "wrote no *_results.json" in report.failed[1].error
    out = cfg.output
    err = json.loads((out / "_failed" / "m7b__v2drop__b128__l2" / "error.json").read_text())
    assert err["returncode"] == 1 and "out of memory" in err["log_tail"]
    assert not (out / "m7b__v2drop__b128__l2").exists() and not list(out.glob(".tmp-*"))
    assert "failed: m7b__fastv__b128" in log.getvalue()

    retry = FakeRunner()
    report = run_sweep(cfg, points, runner=retry, log=io.StringIO())
    assert report.ok and retry.calls == [".tmp-m7b__v2drop__b128__l2", ".tmp-m7b__fastv__b128"]
    assert not (out / "_failed" / "m7b__v2drop__b128__l2").exists()


def test_missing_task_fails_the_point(tmp_path):
    cfg = small_cfg(tmp_path, methods=["none"])
    report = run_sweep(cfg, expand(cfg), runner=FakeRunner(missing_task=["none"]), log=io.StringIO())
    assert report.failed and "no results for task(s) pope" in report.failed[0].error


def test_interrupt_leaves_nothing_half_done(tmp_path):
    cfg = small_cfg(tmp_path)
    points = expand(cfg)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, points, runner=FakeRunner(interrupt=["method=fastv"]), log=io.StringIO())
    out = cfg.output
    assert is_done(out / "m7b__none") and is_done(out / "m7b__v2drop__b128__l2")
    assert not (out / "m7b__fastv__b128").exists() and not list(out.glob(".tmp-*"))
    resume = FakeRunner()
    run_sweep(cfg, points, runner=resume, log=io.StringIO())
    assert resume.calls == [".tmp-m7b__fastv__b128"]


def test_stale_temp_and_unfinished_folders(tmp_path):
    """What a SIGKILL leaves (a temp folder, or a folder without point.json) is never counted as done."""
    cfg = small_cfg(tmp_path, methods=["none", "v2drop"])
    out = cfg.output
    (out / ".tmp-m7b__none" / "v2drop_llava").mkdir(parents=True)
    (out / ".tmp-m7b__none" / "v2drop_llava" / "x_results.json").write_text("{")
    (out / "m7b__v2drop__b128__l2").mkdir(parents=True)
    (out / "m7b__v2drop__b128__l2" / "junk").write_text("")
    fake, log = FakeRunner(), io.StringIO()
    report = run_sweep(cfg, expand(cfg), runner=fake, log=log)
    assert report.ok and len(fake.calls) == 2 and "removing .tmp-m7b__none" in log.getvalue()
    assert not (out / "m7b__v2drop__b128__l2" / "junk").exists()


def test_concurrent_sweep_refused(tmp_path):
    cfg = small_cfg(tmp_path, methods=["none"])
    first = FakeRunner()

    def nested(cmd, log_path, env, timeout):
        with pytest.raises(RuntimeError, match="another sweep is running"):
            run_sweep(cfg, expand(cfg), runner=FakeRunner(), log=io.StringIO())
        return first(cmd, log_path, env, timeout)

    assert run_sweep(cfg, expand(cfg), runner=nested, log=io.StringIO()).ok


# -- the command line, with a stand-in lmms_eval module in a real subprocess -----------------------------
def write_cfg(tmp_path, **over) -> Path:
    fake = install_fake_lmms_eval(tmp_path)
    raw = base_config(methods=["none", "v2drop", "fastv"], budgets=[128], output=str(tmp_path / "sw"),
                      env={"PYTHONPATH": str(fake), "FAKE_LMMS_LOG": str(tmp_path / "calls.log")})
    raw.update(over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def calls(tmp_path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_cli_dry_run(tmp_path, capsys):
    path = write_cfg(tmp_path)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "sweep t: 3 points" in text and "[2/3] m7b__v2drop__b128__l2 (todo)" in text
    assert "-m lmms_eval --model v2drop_llava --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=v2drop," in text
    assert "PYTHONPATH=" in text
    assert not (tmp_path / "sw").exists() and calls(tmp_path) == []


def test_cli_bad_config_runs_nothing(tmp_path, capsys):
    path = write_cfg(tmp_path, methods=["none", "bogus"])
    assert main(["sweep", str(path)]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_cli_failure_exit_status(tmp_path, monkeypatch, capsys):
    path = write_cfg(tmp_path)
    monkeypatch.setenv("FAKE_LMMS_FAIL", "method=fastv")
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "wrote no *_results.json" in out and "Traceback: boom" in out
    assert "\x1b" not in out  # lmms-eval's colour codes are stripped from FAILED lines
    assert len(calls(tmp_path)) == 3
    monkeypatch.delenv("FAKE_LMMS_FAIL")
    status = json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"]
    assert status["m7b__fastv__b128"]["status"] == "failed" and status["m7b__none"]["status"] == "done"
    assert main(["sweep", str(path), "--only", "fastv"]) == 0
    assert len(calls(tmp_path)) == 4
    status = json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"]
    assert {k: v["status"] for k, v in status.items()} == {
        "m7b__none": "done", "m7b__v2drop__b128__l2": "done", "m7b__fastv__b128": "done"}
    assert main(["sweep", str(path)]) == 0 and len(calls(tmp_path)) == 4


def test_killed_sweep_resumes(tmp_path):
    """SIGKILL the sweep while a point runs: finished points stay, the killed one is re-run, no junk."""
    path = write_cfg(tmp_path)
    env = {**os.environ, "FAKE_LMMS_SLOW": "method=v2drop", "FAKE_LMMS_SLEEP": "60"}
    cmd = [sys.executable, "-m", "v2drop_eval.cli", "sweep", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    out = tmp_path / "sw"
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".tmp-m7b__v2drop__b128__l2" / "v2drop_llava" / "partial.txt").exists():
        time.sleep(0.1)
    assert is_done(out / "m7b__none")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "m7b__v2drop__b128__l2").exists()
    env.pop("FAKE_LMMS_SLOW")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skip m7b__none (done)" in res.stdout and "removing .tmp-m7b__v2drop__b128__l2" in res.stdout
    ran = calls(tmp_path)
    assert sum("method=none" in c for c in ran) == 1 and sum("method=v2drop" in c for c in ran) == 2
    assert all(is_done(out / p) for p in ("m7b__none", "m7b__v2drop__b128__l2", "m7b__fastv__b128"))
    assert not list(out.glob(".tmp-*"))


def test_sigterm_cleans_up(tmp_path):
    path = write_cfg(tmp_path)
    env = {**os.environ, "FAKE_LMMS_SLOW": "method=none", "FAKE_LMMS_SLEEP": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "v2drop_eval.cli", "sweep", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    out = tmp_path / "sw"
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".tmp-m7b__none" / "v2drop_llava" / "partial.txt").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert not list(out.glob(".tmp-*")) and not (out / "m7b__none").exists()


def test_timeout_fails_the_point(tmp_path, monkeypatch, capsys):
    path = write_cfg(tmp_path, methods=["none"], timeout=1)
    monkeypatch.setenv("FAKE_LMMS_SLOW", "method=none")
    monkeypatch.setenv("FAKE_LMMS_SLEEP", "30")
    t0 = time.time()
    assert main(["sweep", str(path)]) == 1
    assert time.time() - t0 < 20
    out = capsys.readouterr().out
    assert "exited with status 124" in out and "timed out: killed after 1 s" in out


def test_parallel_jobs(tmp_path):
    cfg = small_cfg(tmp_path, budgets=[192, 128, 64], jobs=3)
    points = expand(cfg)
    fake, log = FakeRunner(fail=["budget=64,metric"]), io.StringIO()
    report = run_sweep(cfg, points, runner=fake, log=log)
    assert sorted(fake.calls) == sorted(".tmp-" + p.id for p in points)
    assert [o.point.id for o in report.outcomes] == [p.id for p in points]  # config order, not finish order
    assert [o.point.id for o in report.failed] == ["m7b__v2drop__b64__l2"]
    assert "(3 at a time)" in log.getvalue()
    assert all(is_done(cfg.output / p.id) for p in points if p.id != "m7b__v2drop__b64__l2")
    again = FakeRunner()
    run_sweep(cfg, points, runner=again, log=io.StringIO(), jobs=2)
    assert again.calls == [".tmp-m7b__v2drop__b64__l2"]


def test_parallel_interrupt_cleans_up(tmp_path):
    cfg = small_cfg(tmp_path, budgets=[192, 128, 64])
    points = expand(cfg)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, points, runner=FakeRunner(interrupt=["budget=128,metric"]), log=io.StringIO(), jobs=2)
    out = cfg.output
    assert not list(out.glob(".tmp-*")) and not (out / "m7b__v2drop__b128__l2").exists()
    done = {p.id for p in points if is_done(out / p.id)}
    resume = FakeRunner()
    run_sweep(cfg, points, runner=resume, log=io.StringIO(), jobs=2)
    assert sorted(resume.calls) == sorted(".tmp-" + p.id for p in points if p.id not in done)


def test_parallel_sigterm_stops_every_point(tmp_path):
    path = write_cfg(tmp_path, jobs=2)
    env = {**os.environ, "FAKE_LMMS_SLOW": "pretrained", "FAKE_LMMS_SLEEP": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "v2drop_eval.cli", "sweep", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    out = tmp_path / "sw"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob(".tmp-*/v2drop_llava/partial.txt"))) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    assert proc.wait(timeout=30) == 143 and time.time() - t0 < 15
    assert not list(out.glob(".tmp-*")) and not any(is_done(d) for d in out.iterdir() if d.is_dir())
    assert len(calls(tmp_path)) == 2


# -- the crash and bad-input probe (issue 15) -------------------------------------------------------
def test_exact_schedule_reaches_id_args_and_point_json(tmp_path):
    cfg = small_cfg(tmp_path, methods=["v2drop"], budgets=[], schedules=["2:0.1736112"])
    (p,) = expand(cfg)
    assert p.id == "m7b__v2drop__s2-0.1736112__l2" and "schedule=2:0.1736112," in p.model_args()
    run_sweep(cfg, [p], runner=FakeRunner(), log=io.StringIO())
    assert json.loads((cfg.output / p.id / "point.json").read_text())["schedule"] == "2:0.1736112"
    with pytest.raises(ConfigError, match="too small to represent"):
        small_cfg(tmp_path, methods=["v2drop"], budgets=[], schedules=["3:1e-400"])


@pytest.mark.parametrize("change, message", [
    ({"seeds": [-1]}, "seeds: seed=-1 is not allowed; a seed is an integer >= 0"),
    ({"seeds": [1.5]}, "seed=1.5 is not allowed"),
    ({"models": [{"name": "m", "family": "llava", "pretrained": "/nonexistent"}]},
     "pretrained=/nonexistent: no such folder /nonexistent"),
    ({"models": [{"name": "m", "family": "llava", "pretrained": "x", "model_args": {"sidecar": "/tmp/s.jsonl"}}]},
     "model_args.sidecar"),
])
def test_probe_configs_refused_before_running(change, message):
    with pytest.raises(ConfigError) as err:
        parse(base_config(**change))
    assert message in str(err.value) and "Repo id" not in str(err.value)


def test_jobs_below_one_refused(tmp_path, capsys):
    path = write_cfg(tmp_path)
    for jobs in ("0", "-2"):
        assert main(["sweep", str(path), "--jobs", jobs]) == 2
        assert f"--jobs {jobs} is not allowed; give an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists() and calls(tmp_path) == []
    cfg = small_cfg(tmp_path)
    with pytest.raises(ValueError, match="jobs=0 is not allowed"):
        run_sweep(cfg, expand(cfg), runner=FakeRunner(), log=io.StringIO(), jobs=0)


def _results_file(point_dir: Path) -> Path:
    return next(point_dir.rglob("*_results.json"))


def _sidecar(point_dir: Path) -> Path:
    return next(point_dir.rglob("*v2drop*.jsonl"))


@pytest.mark.parametrize("damage, reason", [
    (lambda d: _results_file(d).write_text(_results_file(d).read_text()[:20]), "is not valid JSON"),
    (lambda d: _results_file(d).write_text(json.dumps({"results": {"gqa": {"alias": "gqa"}},
                                                       "n-samples": {"gqa": {"effective": 2}}})),
     "no results for task(s) pope"),
    (lambda d: _sidecar(d).write_text(_sidecar(d).read_text()[:-8]), "has 1 corrupt line(s)"),
    (lambda d: _sidecar(d).write_text("".join(_sidecar(d).read_text().splitlines(True)[:3])),
     "side-car has 1 record(s) for task pope, which evaluated 2 item(s)"),
    (lambda d: _sidecar(d).unlink(), "no side-car"),
])
def test_damaged_point_is_redone(tmp_path, capsys, damage, reason):
    """A finished point whose files are damaged is not done: dry-run says 'to redo', the next run redoes
    it and says why, sweep.json never calls it done."""
    path = write_cfg(tmp_path, methods=["none", "fastv"])
    assert main(["sweep", str(path)]) == 0
    out = tmp_path / "sw"
    seconds = json.loads((out / "sweep.json").read_text())["points"]["m7b__none"]["seconds"]
    damage(out / "m7b__fastv__b128")
    assert not is_done(out / "m7b__fastv__b128")
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "[2/2] m7b__fastv__b128 (to redo: " in text and reason in text and "[1/2] m7b__none (done)" in text
    assert main(["sweep", str(path)]) == 0
    text = capsys.readouterr().out
    assert "1 done already, 1 to run (1 to redo)" in text and "redo m7b__fastv__b128: " in text and reason in text
    assert len(calls(tmp_path)) == 3 and is_done(out / "m7b__fastv__b128")
    status = json.loads((out / "sweep.json").read_text())["points"]
    assert status["m7b__none"] == {"status": "done", "seconds": seconds}  # not dropped by a later run


def test_prepare_failure_is_one_line(tmp_path, capsys):
    bad = tmp_path / "assets.json"
    bad.write_text("{corrupt")
    path = write_cfg(tmp_path, prepare={"call": "json:loads", "args": {"s": "{corrupt"}})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prepare step json:loads failed: JSONDecodeError:") and err.count("\n") == 1
    assert "Traceback" not in err and calls(tmp_path) == []


def test_prepare_that_builds_no_model_folder(tmp_path, capsys):
    path = write_cfg(tmp_path, prepare={"call": "os:getcwd", "args": {}},
                     models=[{"name": "m", "family": "llava", "pretrained": str(tmp_path / "built"), "num_layers": 32}])
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "no such folder" in capsys.readouterr().out  # a note: prepare may build it
    assert main(["sweep", str(path)]) == 2
    assert "no such folder" in capsys.readouterr().err and calls(tmp_path) == []


def test_dry_run_into_a_closed_pipe(tmp_path):
    """More than a pipe buffer of output into `head -1`: no BrokenPipeError traceback."""
    path = write_cfg(tmp_path, methods=["v2drop"], budgets=[], schedules=[f"2:{i / 1000}" for i in range(1, 400)])
    proc = subprocess.run(f"{sys.executable} -m v2drop_eval.cli sweep {path} --dry-run | head -1", shell=True,
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.stdout.startswith("sweep t: 399 points") and proc.stderr == ""


def test_closed_stdout_ends_quietly(tmp_path, monkeypatch, capsys):
    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    path = write_cfg(tmp_path)
    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["sweep", str(path), "--dry-run"]) == 141
    assert capsys.readouterr().err == ""


def test_prepare_from_a_file_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a .py path is relative to the current folder, like pretrained paths
    (tmp_path / "build_it.py").write_text(
        "from pathlib import Path\n\ndef build(root):\n    Path(root).mkdir(parents=True, exist_ok=True)\n")
    models = [{"name": "m", "family": "llava", "pretrained": "built", "num_layers": 32}]
    missing = write_cfg(tmp_path, prepare={"call": "nowhere/build_it.py:build", "args": {"root": "built"}},
                        models=models)
    assert main(["sweep", str(missing), "--dry-run"]) == 2
    assert "prepare: no such file nowhere/build_it.py" in capsys.readouterr().err
    path = write_cfg(tmp_path, prepare={"call": "build_it.py:build", "args": {"root": "built"}}, models=models)
    assert main(["sweep", str(path)]) == 0
    assert (tmp_path / "built").is_dir() and len(calls(tmp_path)) == 3


def test_option_sets_expand_to_points():
    raw = base_config(methods=["none", {"method": "pdrop", "options": [[], ["exact_counts"]], "positions": [None, "keep"]},
                               {"method": "dart", "budgets": [128], "options": ["exact_counts+pivots_in_order"]}],
                      budgets=[128])
    points = {p.id: p for p in expand(parse(raw))}
    base = points["m7b__pdrop__b128"]
    kept = points["m7b__pdrop__b128__positions-keep"]
    both = points["m7b__pdrop__b128__exact_counts__positions-keep"]
    assert base.options is None and "options" not in base.model_args() and "positions" not in base.model_args()
    assert kept.positions == "keep" and kept.model_args().endswith("budget=128,positions=keep")
    assert kept.to_dict()["positions"] == "keep" and kept.to_dict()["options"] is None
    assert both.model_args().endswith("budget=128,options=exact_counts,positions=keep")
    assert points["m7b__pdrop__b128__exact_counts"].positions is None
    assert points["m7b__dart__b128__exact_counts+pivots_in_order"].options == "exact_counts+pivots_in_order"
