"""A point is done only for the settings that made it; one run per point folder; partial sweeps and
folders of sweeps in `tables`; the cause of a failed point in `status`; config mistakes caught before
the first point (issue #30). Fake lmms-eval runs: seconds."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from test_sweep import FakeRunner, base_config, parse, small_cfg

from v2drop_eval.cli import main
from v2drop_eval.sweep.config import ConfigError, expand, load_config
from v2drop_eval.sweep.layout import is_done, point_state_for, replace_dir
from v2drop_eval.sweep.pointcheck import point_settings
from v2drop_eval.sweep.preflight import task_problems
from v2drop_eval.sweep.runner import run_sweep
from v2drop_eval.sweep.status import sweep_status


def _run(cfg, points=None):
    fake, log = FakeRunner(), io.StringIO()
    report = run_sweep(cfg, points or expand(cfg), runner=fake, log=log)
    return fake, log.getvalue(), report


@pytest.mark.parametrize("change, shown", [
    ({"limit": 2}, "limit null -> 2"),
    ({"batch_size": 2}, "batch_size 1 -> 2"),
    ({"tasks": ["gqa"]}, 'tasks ["gqa", "pope"] -> ["gqa"]'),
])
def test_other_settings_redo_the_point(tmp_path, change, shown):
    cfg = small_cfg(tmp_path)
    _run(cfg)
    meta = json.loads((cfg.output / "m7b__none" / "point.json").read_text())
    assert meta["settings"] == point_settings(cfg, expand(cfg)[0]) and meta["settings"]["versions"]["lmms_eval"]
    again, text, report = _run(small_cfg(tmp_path, **change))
    assert len(again.calls) == 3 and "0 done already, 3 to run (3 to redo)" in text
    assert f"redo m7b__none: settings changed: {shown}" in text
    assert [o.status for o in report.outcomes] == ["done"] * 3
    same, text, _ = _run(small_cfg(tmp_path, **change))
    assert same.calls == [] and "3 done already, 0 to run" in text


def test_model_args_change_redoes_only_that_model(tmp_path):
    raw = base_config(methods=["none"], output=str(tmp_path / "sw"))
    raw["models"][0]["model_args"] = {"attn_implementation": "sdpa"}
    _run(parse(raw))
    raw["models"][0]["model_args"] = {"attn_implementation": "eager"}
    fake, text, _ = _run(parse(raw))
    assert fake.calls == [".tmp-m7b__none"]
    assert "settings changed: model_args attn_implementation=sdpa -> eager" in text


def test_point_without_recorded_settings_is_redone(tmp_path):
    cfg = small_cfg(tmp_path)
    _run(cfg)
    path = cfg.output / "m7b__none" / "point.json"
    meta = json.loads(path.read_text())
    del meta["settings"]
    path.write_text(json.dumps(meta))
    state, why = point_state_for(cfg, expand(cfg)[0], cfg.output)
    assert state == "redo" and "records no settings" in why
    assert is_done(cfg.output / "m7b__none")  # the files alone are fine


def test_two_runs_in_one_folder_are_never_merged(tmp_path):
    cfg = small_cfg(tmp_path)
    _run(cfg)
    run = cfg.output / "m7b__none" / "v2drop_llava"
    (run / "20250102_000000_results.json").write_text((run / "20250101_000000_results.json").read_text())
    state, why = point_state_for(cfg, expand(cfg)[0], cfg.output)
    assert state == "redo" and "2 runs in one folder" in why
    fake, text, _ = _run(cfg)
    assert fake.calls == [".tmp-m7b__none"] and "2 runs in one folder" in text
    assert sorted(p.name for p in run.iterdir()) == ["20250101_000000_results.json",
                                                     "20250101_000000_v2drop_samples.jsonl", "partial.bin"]


def test_replace_dir_swaps_whole_folders(tmp_path):
    old, new = tmp_path / "p", tmp_path / ".tmp-p"
    (old / "m").mkdir(parents=True)
    (old / "m" / "old_results.json").write_text("old")
    (new / "m").mkdir(parents=True)
    (new / "m" / "new_results.json").write_text("new")
    replace_dir(new, old)
    assert [p.name for p in (old / "m").iterdir()] == ["new_results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_status_and_tables_follow_the_saved_settings(tmp_path, capsys):
    cfg = small_cfg(tmp_path)
    _run(cfg)
    assert {p.state for p in sweep_status(cfg.output)} == {"done"}
    saved = yaml.safe_load((cfg.output / "sweep.yaml").read_text())
    (cfg.output / "sweep.yaml").write_text(yaml.safe_dump({**saved, "limit": 2}))
    pending = sweep_status(cfg.output)
    assert {p.state for p in pending} == {"pending"}
    assert "to redo: settings changed: limit null -> 2" in pending[0].detail
    assert main(["tables", str(cfg.output)]) == 1
    err = capsys.readouterr().err
    assert "3 point(s) not included" in err and "m7b__none: settings changed: limit null -> 2" in err


def test_killed_early_sweep_lists_its_grid(tmp_path, capsys):
    """sweep.yaml and sweep.json are written before the first point runs; `tables` names every point
    of the grid that never ran."""
    cfg = small_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, expand(cfg), runner=FakeRunner(interrupt=("method=none",)), log=io.StringIO())
    status = json.loads((cfg.output / "sweep.json").read_text())["points"]
    assert {k: v["status"] for k, v in status.items()} == {p.id: "pending" for p in expand(cfg)}
    (cfg.output / "sweep.json").unlink()  # as after a kill -9 before the first write: the saved config says it
    assert main(["tables", str(cfg.output)]) == 1
    err = capsys.readouterr().err
    assert "3 point(s) not included" in err and "  m7b__fastv__b128: not run yet" in err
    assert main(["tables", str(cfg.output), "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert all(f"not included: {p.id}: not run yet" in out for p in expand(cfg))


def test_status_shows_the_cause_of_a_failed_point(tmp_path):
    cfg = small_cfg(tmp_path)
    fake = FakeRunner(fail=("method=fastv",))
    report = run_sweep(cfg, expand(cfg), runner=fake, log=io.StringIO())
    assert "cause: RuntimeError: out of memory" in report.failed[0].error
    failed = [p for p in sweep_status(cfg.output) if p.state == "failed"]
    assert failed[0].detail == "lmms-eval exited with status 1 (lmms-eval wrote no *_results.json): " \
                               "RuntimeError: out of memory"


# -- config mistakes caught before the first point --------------------------------------------------------
@pytest.mark.parametrize("model_change, message", [
    ({"model": "v2drop_lava"}, "model 'v2drop_lava' is not an lmms-eval model of family llava; allowed: "
                               "v2drop_llava, v2drop_llava_hf"),
    ({"pretrained": "org/a,b"}, "pretrained='org/a,b': lmms-eval splits model args on ',' and '='"),
])
def test_model_typos_refused(model_change, message):
    raw = base_config()
    raw["models"][0].update(model_change)
    with pytest.raises(ConfigError, match=message):
        parse(raw)


def test_checkpoint_of_another_family_refused(tmp_path):
    ckpt = tmp_path / "qwen"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    raw = base_config()
    raw["models"][0].update(pretrained=str(ckpt), num_layers=4)
    with pytest.raises(ConfigError, match=r"is a 'qwen2_vl' checkpoint, not family llava \(model_type llava or "
                                          r"llava_next or llava_onevision\); use family qwen2_vl"):
        parse(raw)


def test_unknown_task_refused_before_any_point(tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text("task: tiny_mme\ndataset_path: x\n")
    assert task_problems(["tiny_mme", "textvqa_val", "mme"], str(tasks)) == []
    assert task_problems(["tiny_mmee"], str(tasks)) == [
        f"tasks: unknown task 'tiny_mmee' (not in lmms-eval's tasks or include_path {tasks}); did you mean tiny_mme?"]
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(methods=["none"], tasks=["tiny_mmee"], include_path=str(tasks),
                                                   output=str(tmp_path / "sw"))))
    assert main(["sweep", str(cfg_path), "--dry-run"]) == 2
    assert "unknown task 'tiny_mmee'" in capsys.readouterr().err
    cfg = load_config(cfg_path)
    fake = FakeRunner()
    with pytest.raises(RuntimeError, match="unknown task 'tiny_mmee'.*nothing ran"):
        run_sweep(cfg, expand(cfg), runner=fake, log=io.StringIO())
    assert fake.calls == []


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"{path}: cannot read the config"):
        load_config(path)


def test_saved_config_records_the_limit_override(tmp_path, monkeypatch):
    from test_sweep import write_cfg

    path = write_cfg(tmp_path, methods=["none"])
    assert main(["sweep", str(path), "--limit", "2"]) == 0
    assert yaml.safe_load((tmp_path / "sw" / "sweep.yaml").read_text())["limit"] == 2
    assert [p.state for p in sweep_status(tmp_path / "sw")] == ["done"]
    assert main(["sweep", str(path)]) == 0  # without --limit: redone, not "skip (done)"
    meta = json.loads((tmp_path / "sw" / "m7b__none" / "point.json").read_text())
    assert meta["limit"] is None and meta["settings"]["limit"] is None


def test_metric_and_seed_a_method_does_not_take_are_refused():
    from v2drop_eval.methods.rules import check_drop_method
    from v2drop_eval.plugin.args import pop_drop_args  # noqa: F401 - the plugin applies the same rule

    with pytest.raises(ValueError, match="metric=l2 applies to method=v2drop only, not method=random"):
        check_drop_method("random", "l2")
    with pytest.raises(ValueError, match="seed=0 applies to method=random only, not method=v2drop"):
        check_drop_method("v2drop", None, 0)


def test_budget_without_preset_names_the_family():
    from v2drop_eval.methods.presets import preset_text

    with pytest.raises(ValueError, match="no preset for budget 129 in family 'internvl' \\(its preset table is "
                                         "qwen2_vl's\\)"):
        preset_text("internvl", 129)
