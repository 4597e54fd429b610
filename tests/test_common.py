"""common.py: atomic directories survive crashes, the LR schedule, the metrics log."""
import json
import os

import pytest
import torch

import common
from common import MetricsLogger, atomic_dir, checkpoint_exists, lr_at, read_metrics


def test_atomic_dir_replaces_and_a_crash_keeps_the_old(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("1")
    assert open(target / "config.json").read() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("2")
            raise RuntimeError("killed mid-write")
    assert open(target / "config.json").read() == "1"  # the last good state is intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]    # and no temporary is left behind
    with atomic_dir(target) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("3")
    assert open(target / "config.json").read() == "3" and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_crash_between_the_renames_is_recovered(tmp_path):
    # the window in atomic_dir where only ckpt.old exists: readers must find the old checkpoint
    old = tmp_path / "ckpt.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    assert checkpoint_exists(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "config.json").exists() and not old.exists()


def test_two_ranks_recovering_at_once(tmp_path, monkeypatch):
    # every rank recovers ckpt.old on a shared disk: one rename wins, the others find it done
    old = tmp_path / "ckpt.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    common._recover(str(tmp_path / "ckpt"))   # the winner
    seen_before = {str(tmp_path / "ckpt"): False, str(old): True}   # what a slower rank had seen
    monkeypatch.setattr(common.os.path, "exists", lambda p: seen_before.get(p, os.path.lexists(p)))
    common._recover(str(tmp_path / "ckpt"))   # its rename finds no ckpt.old: not an error
    monkeypatch.undo()
    assert checkpoint_exists(str(tmp_path / "ckpt"))


def test_killed_writes_leave_no_temporaries(tmp_path):
    # SIGKILL skips atomic_dir's cleanup: the next write of that path deletes what it left
    target = tmp_path / "ckpt"
    (tmp_path / "ckpt.tmp-killed").mkdir()
    (tmp_path / "ckpt.tmp-killed" / "model.safetensors").write_text("half")
    (tmp_path / "other.tmp-x").mkdir()   # another path's: not ours to delete
    with atomic_dir(target) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("1")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "other.tmp-x"]


def test_read_metrics_after_a_crash_in_mid_write(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "lo')   # killed while writing step 2
    assert read_metrics(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')   # damage elsewhere is an error
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(50, 100, 10, 2.0, schedule="constant") == 2.0
    values = [lr_at(s, 100, 10, 1.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_metrics_logger_appends(tmp_path):
    log = MetricsLogger(str(tmp_path / "m" / "metrics.jsonl"))
    log.log({"step": 0, "loss": 1.5})
    log.log({"step": 1, "loss": 1.0})
    rows = read_metrics(str(tmp_path / "m" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["loss"] == 1.0 and "time" in rows[0]
    json.dumps(rows)


def test_checkpoint_round_trip_with_optimizer(tmp_path):
    import torch
    from common import load_checkpoint, load_optimizer, save_checkpoint
    from model import ModelConfig, Transformer
    cfg = ModelConfig.from_json("configs/tiny.json")
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model(ids)[0].logsumexp(-1).mean().backward()
    opt.step()
    from data import train_tokenizer
    tok = tmp_path / "tokenizer.json"
    train_tokenizer(["a checkpoint carries its tokenizer"], 300).save(str(tok))
    save_checkpoint(str(tmp_path / "ck"), model, str(tok), opt, {"step": 1})
    model2, state = load_checkpoint(str(tmp_path / "ck"))
    assert state["step"] == 1 and (tmp_path / "ck" / "tokenizer.json").read_text() == tok.read_text()
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    load_optimizer(str(tmp_path / "ck"), model2, opt2, state)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # the next step of both optimizers is identical: resuming is exact
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(ids)[0].logsumexp(-1).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    wrong = torch.optim.AdamW(list(model2.parameters())[:3], lr=1e-3)
    with pytest.raises(ValueError, match="does not match"):
        load_optimizer(str(tmp_path / "ck"), model2, wrong, state)
    # files cut short (a copy interrupted, a full disk): errors that name them
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        file = tmp_path / "ck" / name
        whole = file.read_bytes()
        file.write_bytes(whole[:len(whole) // 2])
        with pytest.raises(ValueError, match=f"{file}: not "):
            model3, state3 = load_checkpoint(str(tmp_path / "ck"))
            load_optimizer(str(tmp_path / "ck"), model3, torch.optim.AdamW(model3.parameters()), state3)
        file.write_bytes(whole)


def test_metrics_logger_drops_steps_a_resumed_run_will_log_again(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLogger(path)
    for step in range(5):
        log.log({"step": step})
    log.log({"rm_loss": 0.5})                     # rows without a step are kept
    MetricsLogger(path, drop_from_step=3).log({"step": 3})
    assert [r.get("step") for r in read_metrics(path)] == [0, 1, 2, None, 3]


def test_a_line_cut_short_is_dropped_before_new_rows_are_appended(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"rm_step": 0}\n{"rm_step": 1, "rm_lo')   # killed in mid-write
    MetricsLogger(path).log({"rm_step": 1})                  # a rerun, not resuming from a step
    assert [r["rm_step"] for r in read_metrics(path)] == [0, 1]
    MetricsLogger(path, drop_from_step=0)                    # and the log still reads afterwards


def test_a_gradient_that_is_not_finite_stops_before_the_optimizer_step():
    w = torch.nn.Parameter(torch.ones(3))
    (w * float("nan")).sum().backward()
    with pytest.raises(FloatingPointError, match="gradient norm is nan"):
        common.clip_grad_norm([w], 1.0)
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert common.clip_grad_norm([w], 1.0).item() == 5.0 and torch.allclose(w.grad.norm(), torch.tensor(1.0))


@pytest.mark.parametrize("text, ok", [("3", True), ("0.5", True), ("0", False), ("-2", False),
                                      ("inf", False), ("nan", False), ("1e999", False)])
def test_positive_arguments(text, ok):
    import argparse
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--temperature", type=common.pos_float)
    p.add_argument("--top_p", type=common.positive(float, at_most=1.0))
    if ok:
        assert p.parse_args(["--temperature", text]).temperature == float(text)
    else:
        with pytest.raises(argparse.ArgumentError, match=f"--temperature: {text}: must be > 0"):
            p.parse_args(["--temperature", text])
    assert p.parse_args(["--top_p", "1"]).top_p == 1.0
    with pytest.raises(argparse.ArgumentError, match="--top_p: 1.5: must be > 0 and <= 1.0"):
        p.parse_args(["--top_p", "1.5"])


def test_state_files_that_are_not_json_objects_are_named(tmp_path):
    from common import finished_summary, read_json
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    state = tmp_path / "final" / "trainer_state.json"
    for text, message in [('{"summary": {"lo', "not JSON"), ("[1, 2]", "expected a JSON object, found list")]:
        state.write_text(text)
        with pytest.raises(ValueError, match=f"{state}: {message}"):
            finished_summary(str(tmp_path))
    state.write_text('{"summary": {"loss": 1.5}}')
    assert read_json(str(state)) == {"summary": {"loss": 1.5}} and finished_summary(str(tmp_path)) == {"loss": 1.5}


def test_finished_summary_is_the_stage_contract(tmp_path):
    from common import finished_summary
    out = tmp_path / "stage"
    assert finished_summary(str(out)) is None                 # never ran
    (out / "last").mkdir(parents=True)
    (out / "last" / "config.json").write_text("{}")
    assert finished_summary(str(out)) is None                 # interrupted: resumes from last/
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    (out / "final" / "trainer_state.json").write_text(json.dumps({"summary": {"loss": 0.5}}))
    assert finished_summary(str(out)) == {"loss": 0.5}       # done: not run again
