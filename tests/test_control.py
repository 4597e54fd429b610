"""MOPD's GRPO control (cascade.py, a MOPD stage's `control` table): it starts where MOPD starts, draws
the same prompts for the same steps, is scored on the same held-out prompts, and stays out of the
cascade: no row in the table, no teacher, and the next stage starts from MOPD's checkpoint."""
import json
import shutil
from types import SimpleNamespace

import pytest

import cascade
import grpo
import mopd
import report
import rl
from test_cascade import CONFIG, write_recipe
from test_run_dir import RL, data_dir  # noqa: F401  (a module fixture: the small built-in data)


def control_recipe(path, data_dir, **mopd_args):
    return write_recipe(path, {
        "model": CONFIG, "data": data_dir, "device": "cpu",
        "eval": {"limit": 2, "max_new_tokens": 4, "domains": ["math", "if", "chat"]},
        "stage": [{"name": "sft", "script": "sft", "args": {"steps": 2, "batch_size": 2, "seq_len": 256}},
                  {"name": "rl", "script": "grpo", "args": dict(RL, steps=1, domains=["if"])},
                  {"name": "mopd", "script": "mopd", "args": dict(RL, steps=2, **{"domains": ["math", "if"], **mopd_args}),
                   "control": {"lr": 1e-3, "group_size": 2}},
                  {"name": "after", "script": "grpo", "args": dict(RL, steps=1)}]})


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_the_control_runs_beside_the_cascade(tmp_path, data_dir, monkeypatch):  # noqa: F811
    calls = {"grpo": [], "mopd": []}
    real_grpo, real_mopd = grpo.main, mopd.main
    monkeypatch.setattr(grpo, "main", lambda argv: calls["grpo"].append(argv) or real_grpo(argv))
    monkeypatch.setattr(mopd, "main", lambda argv: calls["mopd"].append(argv) or real_mopd(argv))
    monkeypatch.setattr(cascade, "regressed", lambda rows, names, ref, best, domains: domains)   # curves for all three
    run = tmp_path / "run"
    recipe = control_recipe(tmp_path / "r.toml", data_dir, eval_every=1, domains=["math", "if", "chat"], mix=[1, 1, 2])
    table = cascade.main(["--recipe", recipe, "--run_dir", str(run)])

    (m,), (_, control, after) = calls["mopd"], calls["grpo"]   # (the stage before MOPD, its control, the stage after)
    assert flag(control, "--out") == str(run / "controls" / "mopd")
    for name in ("--init", "--seed", "--steps", "--prompts_per_step", "--max_new_tokens",
                 "--eval_every", "--eval_prompts", "--eval_domains", "--eval_max_new_tokens", "--eval_thinking",
                 "--eval_samples"):
        assert flag(control, name) == flag(m, name), name   # same start, prompts, steps, held-out set
    for name in ("--domains", "--mix"):   # MOPD's prompts are drawn, chat's then left out: no reward for chat
        assert flag(control, name) == flag(m, name)
    assert flag(m, "--domains") == "math,if,chat" and flag(control, "--skip_domains") == "chat"
    assert flag(control, "--eval_domains") == "math,if,chat"
    assert flag(m, "--eval_reference") == str(run / "stages" / "sft" / "final")   # chat: a win rate against sft
    assert flag(control, "--lr") == "0.001" and "--teachers" not in control
    assert flag(m, "--init") == str(run / "stages" / "rl" / "final")
    assert flag(after, "--init") == str(run / "stages" / "mopd" / "final")   # the cascade goes on from MOPD

    rows = json.loads((run / "eval.json").read_text())["rows"]
    assert list(rows) == list(table) == ["sft", "rl", "mopd", "after"]   # no row for the control (nor the random init)
    registry = json.loads((run / "teachers.json").read_text())
    assert all("controls" not in t["checkpoint"] for t in registry.values())
    ctl = rows["mopd"]["control"]
    assert ctl["domains"] == ["math", "if", "chat"]
    for d in ctl["domains"]:   # (chat: the judge's win rate against sft's answers, curves and table alike)
        assert ctl["start"][d] == table["rl"][d]   # both curves start at the table's score of the stage before
        for method in ("mopd", "grpo"):
            assert [s for s, _ in ctl[method][d]] == [0, 1, 2]   # --eval_every 1, 2 steps
            assert ctl[method][d][0][1] == table["rl"][d]
        assert ctl["mopd"][d][-1][1] == pytest.approx(table["mopd"][d])   # MOPD's last point is its row in the table
    report_md = (run / "report.md").read_text()
    assert "against its GRPO control" in report_md and "GRPO has no reward for chat" in report_md


def test_a_finished_control_is_not_rerun_with_other_arguments(tmp_path, data_dir, capsys):  # noqa: F811
    """MOPD retrained (its directory deleted) beside a finished control: the control, which starts
    where MOPD starts, is kept, and if the recipe now gives it other arguments the cascade says so."""
    run = tmp_path / "run"
    recipe = control_recipe(tmp_path / "r.toml", data_dir, eval_every=1)
    cascade.main(["--recipe", recipe, "--run_dir", str(run)])
    ran = json.loads((run / "controls" / "mopd" / "cascade_args.json").read_text())
    assert ran["script"] == "grpo" and flag(ran["args"], "--lr") == "0.001"
    for stage in ("mopd", "after"):
        shutil.rmtree(run / "stages" / stage)
    with open(recipe) as f:
        text = f.read().replace("control = {lr = 0.001, ", "control = {lr = 0.002, ")
    with open(recipe, "w") as f:
        f.write(text)
    capsys.readouterr()
    cascade.main(["--recipe", recipe, "--run_dir", str(run)])
    out = capsys.readouterr().out
    assert (f"the control of mopd is done ({run}/controls/mopd/final), with: grpo.py " in out
            and "--lr 0.002" in out and f"delete {run}/controls/mopd and run again" in out)
    assert json.loads((run / "controls" / "mopd" / "cascade_args.json").read_text()) == ran


def test_a_control_needs_a_mopd_stage_with_curves(tmp_path, data_dir):  # noqa: F811
    with pytest.raises(cascade.RecipeError, match="control: only for a mopd stage whose args set eval_every"):
        cascade.main(["--recipe", control_recipe(tmp_path / "r.toml", data_dir), "--run_dir", str(tmp_path / "run")])
    bad = control_recipe(tmp_path / "b.toml", data_dir, eval_every=1)
    with open(bad) as f:
        text = f.read().replace("control = {lr = 0.001, group_size = 2}", "control = {lr = 0.001, groupsize = 2}")
    with open(bad, "w") as f:
        f.write(text)
    with pytest.raises(cascade.RecipeError, match="control: .*groupsize"):
        cascade.main(["--recipe", bad, "--run_dir", str(tmp_path / "run")])
    chat = control_recipe(tmp_path / "c.toml", data_dir, eval_every=1, domains=["chat"])
    with pytest.raises(cascade.RecipeError, match="control: --skip_domains 'chat': .*GRPO has no reward for chat"):
        cascade.main(["--recipe", chat, "--run_dir", str(tmp_path / "run")])
    chat = control_recipe(tmp_path / "c.toml", data_dir, eval_every=1, domains=["math", "chat"])
    with open(chat) as f:
        text = f.read().replace("control = {lr = 0.001, ", 'control = {skip_domains = [], lr = 0.001, ')
    with open(chat, "w") as f:
        f.write(text)
    with pytest.raises(cascade.RecipeError, match="control: GRPO on chat would be rewarded by the hidden judge"):
        cascade.main(["--recipe", chat, "--run_dir", str(tmp_path / "run")])


def test_the_control_trains_on_mopds_very_prompts_less_chats():
    """rl.step_prompts: with --skip_domains chat, every step's prompts (and their chat modes) are
    MOPD's, in MOPD's order, less chat's; on two ranks, each rank's share of those."""
    pools = {d: [{"domain": d, "id": f"{d}{i}"} for i in range(50)] for d in ("math", "if", "chat")}
    argv = ["--init", "x", "--out", "x", "--data", "x", "--seed", "7", "--domains", "math,if,chat",
            "--mix", "1,1,2", "--prompts_per_step", "24", "--thinking", "mixed"]
    m = mopd.build_parser().parse_args(argv + ["--teachers", "math=x,if=x,chat=x"])
    g = grpo.build_parser().parse_args(argv + ["--skip_domains", "chat"])

    def prompts(args, rank=0, world_size=1):
        domains, mix = rl.domains_and_mix(args)
        run = SimpleNamespace(pools=pools, domains=domains, mix=mix, dist=SimpleNamespace(rank=rank, world_size=world_size))
        return [rl.step_prompts(run, args, step) for step in range(5)]
    for theirs, ours in zip(prompts(m), prompts(g)):
        assert any(r["domain"] == "chat" for r in theirs) and ours and ours == [r for r in theirs if r["domain"] != "chat"]
        assert {r["thinking"] for r in ours} == {True, False}
    for step, ours in enumerate(prompts(g)):
        assert prompts(g, 0, 2)[step] + prompts(g, 1, 2)[step] == ours[0::2] + ours[1::2]
    for skip in ("math,if,chat", "tool"):   # nothing left to train on; not a domain of --domains
        with pytest.raises(ValueError, match=f"--skip_domains '{skip}'"):
            rl.domains_and_mix(grpo.build_parser().parse_args(argv + ["--skip_domains", skip]))


def test_control_table_reads_the_steps_to_the_target():
    ctl = {"domains": ["if"], "start": {"if": 0.2}, "teacher": {"if": 0.5},
           "mopd": {"if": [[0, 0.2], [3, 0.46], [6, 0.5]]}, "grpo": {"if": [[0, 0.2], [3, 0.3], [6, 0.44]]}}
    lines = report.control_lines("mopd", ctl)
    assert lines[4].startswith("| if | .200 | .500 | .450 | 3 | not reached |")
    assert not any("nothing to recover" in line for line in lines)
    ctl["start"]["if"] = 0.46   # already within 90% of the teacher
    assert any("nothing to recover" in line for line in report.control_lines("mopd", ctl))


def test_mopd_recovers_the_domains_that_fell_significantly_below_their_teachers():
    """cascade.regressed: the curves are drawn for the domains whose latest scores are below their
    teacher's with paired z <= -3 (here: b, 40 of 40 prompts lost; a lost 2 of 40, z -1.4);
    with none that far down, for every domain below its teacher; with none below, for all."""
    n = 40
    row = lambda a, b: {"scores": {}, "per_prompt": {"a": a, "b": b}, "chat_judge": None}
    rows = {"sft": row([1] * n, [1] * n), "rl": row([0, 0] + [1] * (n - 2), [0] * n)}
    best = {"a": {"stage": "sft"}, "b": {"stage": "sft"}}
    assert cascade.regressed(rows, ["sft", "rl"], "sft", best, ["a", "b"]) == ["b"]
    rows["rl"] = row([0, 0] + [1] * (n - 2), [1] * n)
    assert cascade.regressed(rows, ["sft", "rl"], "sft", best, ["a", "b"]) == ["a"]
    rows["rl"] = row([1] * n, [1] * n)
    assert cascade.regressed(rows, ["sft", "rl"], "sft", best, ["a", "b"]) == ["a", "b"]
