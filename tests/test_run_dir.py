"""The run directory (cascade.py, common.py): one writer at a time; every result a stage reports
survives a kill at any moment; a copied or moved run uses its own checkpoints; a stage that diverges
stops itself, naming itself and the step; a finished stage whose recipe arguments changed says so;
no temporary outlives a kill.

Kills are real: a cascade in a subprocess SIGKILLs itself at a named point
(NANOCASCADE_KILL_AT=<point>, common.kill_point), then the same command runs again. The cascade is a
micro recipe: every script, a step each, one math prompt to evaluate."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import cascade
import common
import data
import grpo
import mopd
import rlhf
import sft
from model import ModelConfig, Transformer
from test_cascade import CONFIG, ROOT, write_recipe

RL = dict(prompts_per_step=1, group_size=2, max_new_tokens=4, micro_batch=2, domains=["math"])
STAGES = ["sft", "rl", "mopd", "rlhf"]


def micro_recipe(path, data_dir, sft_steps=2):
    return write_recipe(path, {
        "model": CONFIG, "data": data_dir, "device": "cpu",
        "eval": {"limit": 1, "max_new_tokens": 4, "domains": ["math"]},
        "stage": [{"name": "sft", "script": "sft",
                   "args": {"steps": sft_steps, "batch_size": 2, "seq_len": 256, "save_every": 1}},
                  {"name": "rl", "script": "grpo", "args": dict(RL, steps=1)},
                  {"name": "mopd", "script": "mopd", "args": dict(RL, steps=1)},
                  {"name": "rlhf", "script": "rlhf", "args": dict(RL, steps=1, rm_steps=1, rm_batch=2,
                                                                   eval_prompts=1, domains=["chat"])}]})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data.build(str(tmp_path_factory.mktemp("data")), seed=0, sizes=dict(sft=40, rl=4, eval=2, prefs=8))


def run_killed(recipe, run, point):
    """python cascade.py in a subprocess that SIGKILLs itself at `point`."""
    env = {k: v for k, v in os.environ.items() if k != "NANOCASCADE_TRITON"}
    proc = subprocess.run([sys.executable, "cascade.py", "--recipe", recipe, "--run_dir", str(run)], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1", "NANOCASCADE_KILL_AT": point},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]


def events(run):
    return [(r["event"], r["stage"]) for r in common.read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    """The micro cascade, killed right after SFT's final checkpoint (before SFT's last/ goes and
    before the cascade records the stage), then right after RLHF's (before its reward-model and judge
    figures reach its summary), then run to the end."""
    tmp = tmp_path_factory.mktemp("runs")
    recipe, run = micro_recipe(tmp / "micro.toml", data_dir), tmp / "run"
    run_killed(recipe, run, "final_saved:sft")
    assert (run / "stages" / "sft" / "last").is_dir() and (run / "stages" / "sft" / "final").is_dir()
    run_killed(recipe, run, "final_saved:rlhf")
    assert (run / "stages" / "rlhf" / "final").is_dir()
    assert "judge_win_rate" not in common.finished_summary(str(run / "stages" / "rlhf"))
    cascade.main(["--recipe", recipe, "--run_dir", str(run)])
    return recipe, run


# ---- 1. one writer at a time


def cascade_process(recipe, run, **popen):
    env = {k: v for k, v in os.environ.items() if k != "NANOCASCADE_TRITON"}
    return subprocess.Popen([sys.executable, "cascade.py", "--recipe", recipe, "--run_dir", str(run)], cwd=ROOT,
                            env={**env, "OMP_NUM_THREADS": "1"}, text=True, **popen)


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, data_dir):
    recipe, run = micro_recipe(tmp_path / "micro.toml", data_dir, sft_steps=100_000), tmp_path / "run"
    first = cascade_process(recipe, run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "stages" / "sft" / "cascade_args.json").exists():   # the first is training SFT
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = cascade_process(recipe, run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, err = second.communicate(timeout=60)   # refused at once, not after the first is done
        finally:
            second.kill()
        assert second.returncode == 1, err[-2000:]
        assert f"RunInUse: {run} is in use: another cascade is writing it (pid {first.pid} on " in err
        assert first.poll() is None   # the first goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with cascade.run_lock(str(run)):   # the kernel dropped the killed holder's lock
        assert f"pid {os.getpid()} on " in (run / ".lock").read_text()


# ---- 2. whatever a stage reports is part of it being done


def test_what_a_stage_reports_survives_a_kill_before_the_cascade_records_it(finished_run):
    _, run = finished_run
    assert not (run / "stages" / "sft" / "last").exists()   # final supersedes it: gone on the rerun
    assert sorted(events(run)) == sorted([(e, s) for s in STAGES for e in ("stage", "eval")])
    rows = json.loads((run / "eval.json").read_text())["rows"]
    summaries = {r["stage"]: r for r in common.read_metrics(run / "metrics.jsonl") if r["event"] == "stage"}
    for key in ("judge_win_rate", "rm_eval_acc", "rm_train_acc"):   # RLHF's figures, in every record
        assert key in rows["rlhf"]["summary"] and key in summaries["rlhf"]
        assert key in common.finished_summary(str(run / "stages" / "rlhf"))
    assert summaries["sft"]["steps"] == 2 and rows["sft"]["summary"]["loss"] == summaries["sft"]["loss"]


def test_a_kill_between_the_records_logs_the_missing_rows_once(finished_run, tmp_path):
    recipe, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    run = tmp_path / "run"
    shutil.rmtree(run / "stages" / "rlhf")
    run_killed(recipe, run, "recorded:rlhf")   # eval.json has the new row, metrics.jsonl not yet
    assert events(run).count(("stage", "rlhf")) == events(run).count(("eval", "rlhf")) == 1
    cascade.main(["--recipe", recipe, "--run_dir", str(run)])
    # the first run's rows and the retrained stage's, once each
    assert events(run).count(("stage", "rlhf")) == events(run).count(("eval", "rlhf")) == 2
    assert events(run)[-2:] == [("stage", "rlhf"), ("eval", "rlhf")]


def test_save_final_deletes_last_without_leaving_half_of_it(tmp_path, monkeypatch):
    from data import train_tokenizer
    model, tok = Transformer(ModelConfig.from_json(CONFIG)), tmp_path / "tokenizer.json"
    train_tokenizer(["a checkpoint carries its tokenizer"], 300).save(str(tok))
    common.save_checkpoint(str(tmp_path / "last"), model, str(tok), state={"step": 1})
    removed = []

    def killed_midway(path, ignore_errors=False):   # the deletion of the files, cut short
        removed.append(path)
        if not ignore_errors:
            raise KeyboardInterrupt("killed while deleting")
    monkeypatch.setattr(common.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        common.remove_last(str(tmp_path))
    # last/ is gone at once, whole: what the kill leaves is a temporary, which the next run sweeps
    assert not (tmp_path / "last").exists() and (tmp_path / "last.tmp-removed").is_dir()
    assert removed[-1] == str(tmp_path / "last.tmp-removed")


# ---- 3. a run can be copied and moved


def test_a_copied_run_uses_its_own_checkpoints_after_the_original_moved(finished_run, tmp_path, monkeypatch):
    recipe, run = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for stage in ("mopd", "rlhf"):
        shutil.rmtree(copy / "stages" / stage)
    moved = tmp_path / "moved"
    shutil.move(run, moved)   # the original is gone from where it was
    try:
        seen = []
        monkeypatch.setattr(mopd, "main", lambda argv: seen.append(argv) or real_mopd_main(argv))
        cascade.main(["--recipe", recipe, "--run_dir", str(copy)])
    finally:
        shutil.move(moved, run)
    teachers = dict(kv.split("=") for kv in seen[0][seen[0].index("--teachers") + 1].split(","))
    assert teachers and all(path.startswith(str(copy) + os.sep) for path in teachers.values())
    rows = json.loads((copy / "eval.json").read_text())["rows"]
    assert {r["checkpoint"] for r in rows.values()} == {f"stages/{s}/final" for s in STAGES}
    registry = json.loads((copy / "teachers.json").read_text())
    assert registry and all(not os.path.isabs(t["checkpoint"]) for t in registry.values())


real_mopd_main = mopd.main


# ---- 4. a stage that blows up says where, and last/ keeps good weights


@pytest.fixture
def sft_args(data_dir, tmp_path):
    return ["--config", CONFIG, "--data", data_dir, "--out", str(tmp_path / "stages" / "sft"), "--batch_size", "2",
            "--seq_len", "256", "--warmup", "0", "--log_every", "1"]


def test_weights_that_blow_up_are_never_saved(sft_args, tmp_path):
    with pytest.raises(FloatingPointError, match=r"stages/sft/last: not saved: at step 1: the weights blew up "
                                                 r"\(max \|w\| [0-9.e+]+ > 1e\+04"):
        sft.main(sft_args + ["--lr", "1e6", "--steps", "3", "--save_every", "1"])
    assert not (tmp_path / "stages" / "sft" / "last").exists() and not (tmp_path / "stages" / "sft" / "final").exists()


def test_a_stage_that_diverges_names_itself_and_the_step(sft_args, tmp_path, data_dir):
    # SFT's step 1 takes the weights to ~1e30: step 2's forward overflows, its gradient is NaN
    with pytest.raises(FloatingPointError, match=r"stages/sft: step 2: the gradient norm is nan"):
        sft.main(sft_args + ["--lr", "1e30", "--steps", "3"])
    # in RL the next rollout would sample from NaN logits: the weights are checked after each step
    init = tmp_path / "init"
    common.save_checkpoint(str(init), Transformer(ModelConfig.from_json(CONFIG)),
                           os.path.join(data_dir, "tokenizer.json"))
    rl = ["--init", str(init), "--data", data_dir, "--out", str(tmp_path / "stages" / "rl"), "--lr", "1e30",
          "--warmup", "0", "--steps", "3", "--save_every", "1", "--prompts_per_step", "2", "--group_size", "4",
          "--max_new_tokens", "8", "--filter_groups", "off", "--overlong", "none", "--thinking", "off"]
    with pytest.raises(FloatingPointError, match=r"stages/rl: step 0: the weights blew up \(max \|w\| 1e\+30"):
        grpo.main(rl)
    assert not (tmp_path / "stages" / "rl" / "last").exists()


# ---- 5. no silent no-ops


def test_a_finished_stage_with_changed_arguments_says_how_to_retrain_it(finished_run, tmp_path, data_dir, capsys):
    _, run = finished_run
    table = cascade.main(["--recipe", micro_recipe(tmp_path / "micro.toml", data_dir, sft_steps=3),
                          "--run_dir", str(run)])
    out = capsys.readouterr().out
    assert (f"stage sft is done ({run}/stages/sft/final), with: sft.py --steps 2 " in out
            and "the recipe now says: sft.py --steps 3 " in out and f"delete {run}/stages/sft " in out)
    assert "stage rl is done" not in out and list(table) == STAGES


@pytest.mark.parametrize("script", [sft, grpo, mopd, rlhf])
def test_stage_scripts_take_no_abbreviations(script, capsys):
    required = (["--out", "o", "--data", "d"] + (["--config", "c"] if script is sft else ["--init", "i"])
                + (["--teachers", "math=t"] if script is mopd else []))
    assert script.build_parser().parse_args(required + ["--steps", "3"]).steps == 3
    with pytest.raises(SystemExit):
        script.build_parser().parse_args(required + ["--step", "3"])
    assert "unrecognized arguments: --step 3" in capsys.readouterr().err


@pytest.mark.parametrize("script, ok", [(grpo, False), (rlhf, False), (mopd, True)])
def test_group_size_one_is_refused_where_advantages_compare_a_group(script, ok, capsys):
    argv = ["--out", "o", "--data", "d", "--init", "i", "--group_size", "1"]
    argv += ["--teachers", "math=t"] if script is mopd else []
    if ok:   # MOPD's advantage is the teacher's per-token verdict: a group of one is fine
        assert script.build_parser().parse_args(argv).group_size == 1
        return
    with pytest.raises(SystemExit):
        script.build_parser().parse_args(argv)
    assert "argument --group_size: 1: must be >= 2 (a group of one has no spread" in capsys.readouterr().err


# ---- 6. no temporary outlives a kill


def test_stale_temporaries_are_removed_at_start(finished_run, tmp_path):
    recipe, run = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    stale = ["stages/mopd/last.tmp-k3j2", "stages/sft/final.tmp-x9", "stages/sft/last.tmp-removed",
             "controls/mopd/last.tmp-77aa"]   # (a MOPD stage's GRPO control writes there)
    for d in stale:
        (copy / d).mkdir(parents=True)
        (copy / d / "model.safetensors").write_text("half")
    files = ["stages/rl/final/model.safetensors.tmp", "data/eval/math.jsonl.tmp4242", "eval.json.tmp",
             "stages/rlhf/final/trainer_state.json.tmp"]
    (copy / "data" / "eval").mkdir(parents=True)   # (where built-in data is built, data.build)
    for f in files:
        (copy / f).write_text("half")
    cascade.main(["--recipe", recipe, "--run_dir", str(copy)])
    assert not [p for p in stale + files if (copy / p).exists()]
    assert not [p for p in copy.rglob("*") if cascade.TEMPORARY.search(p.name)]
