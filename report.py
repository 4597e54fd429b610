"""
The evidence: held-out scores with their standard errors, each stage's change as a paired
difference on the same prompts, and MOPD against its GRPO control. cascade.py calls write_report;
the statistics are plain functions a test can pin.

Why paired: every stage is scored on the same held-out prompts, so the change a stage made is best
measured prompt by prompt, d_i = after_i - before_i. Prompts differ far more in difficulty than a
stage changes them, and pairing removes that spread from the error: SE(mean d) is usually much
smaller than the SEs of the two means combined. z = mean(d) / SE(mean d); a change with |z| >= 3 is
marked (about a 1-in-370 chance under "no change", before counting how many cells we look at).
"""

import math
import os


def mean_se(x):
    """-> (mean, its standard error s / sqrt(n), s the sample std with n - 1). n < 2: SE 0."""
    n = len(x)
    if n == 0:
        return 0.0, 0.0
    m = sum(x) / n
    s2 = sum((v - m) ** 2 for v in x) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(s2 / n)


def paired(after, before):
    """The paired change on the same prompts -> (mean of d, SE of that mean, z), d_i = after_i -
    before_i. z is 0 for no change at all, and +-inf for a change without spread."""
    if len(after) != len(before):
        raise ValueError(f"paired: {len(after)} scores against {len(before)}: not the same prompts")
    m, se = mean_se([a - b for a, b in zip(after, before)])
    return m, se, (m / se if se > 0 else 0.0 if m == 0 else math.copysign(math.inf, m))


def steps_to_reach(curve, target):
    """The first step at which a held-out curve [(step, score), ...] reaches `target`, or None."""
    return next((step for step, score in curve if score >= target), None)


def fmt(x):
    """.123 style: three decimals, no leading zero (as the paper's tables print scores)."""
    s = f"{x:.3f}"
    return s.replace("0.", ".", 1) if s.startswith(("0.", "-0.")) else s


def score_table(scores, cols):
    """{stage: {column: [per-prompt scores]}} -> markdown rows 'mean ± SE'."""
    lines = ["| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in scores.items():
        cells = [f"{fmt(m)} ± {fmt(se)}" if c in s else "-" for c in cols for m, se in [mean_se(s.get(c, []))]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def change_table(scores, cols, z_mark=3.0):
    """Each stage against the one before it, prompt by prompt: 'mean d (z)', bold where |z| >= z_mark.
    A column the stage before did not score is compared with the last stage that did (the cell
    names it): the change over the stages in between."""
    lines = ["| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    names = list(scores)
    for k, name in enumerate(names[1:], 1):
        cells = []
        for c in cols:
            prev = next((p for p in reversed(names[:k]) if c in scores[p]), None)
            if c not in scores[name] or prev is None:
                cells.append("-")
                continue
            m, _, z = paired(scores[name][c], scores[prev][c])
            cell = f"{'+' if m >= 0 else ''}{fmt(m)} ({z:+.1f})" if math.isfinite(z) else f"{fmt(m)} (exact)"
            cell = f"**{cell}**" if abs(z) >= z_mark else cell
            cells.append(cell if prev == names[k - 1] else f"{cell} since {prev}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def control_lines(name, ctl):
    """The MOPD-vs-GRPO table: for each domain MOPD must recover, its start and teacher scores and
    the updates each method needed to reach 90% of the teacher (the paper's claim: MOPD, far fewer)."""
    lines = [f"MOPD stage `{name}` against its GRPO control (same start, prompts and steps; held-out "
             f"score after n updates):", "",
             "| domain | start | teacher | 90% | MOPD reaches it at | GRPO reaches it at | MOPD curve | GRPO curve |",
             "|---|---|---|---|---|---|---|---|"]
    for d in ctl["domains"]:
        target = 0.9 * ctl["teacher"][d]
        at = [steps_to_reach(ctl[m][d], target) for m in ("mopd", "grpo")]
        curve = [" ".join(f"{s}:{fmt(v)}" for s, v in ctl[m][d]) for m in ("mopd", "grpo")]
        lines.append(f"| {d} | {fmt(ctl['start'][d])} | {fmt(ctl['teacher'][d])} | {fmt(target)} | "
                     + " | ".join("not reached" if s is None else str(s) for s in at) + f" | {curve[0]} | {curve[1]} |")
    if "chat" in ctl["domains"]:
        lines += ["", "GRPO has no reward for chat: RL never sees the hidden judge, and the reward model comes "
                  "with RLHF, after MOPD (the paper's comparison for chat). So the control trains on MOPD's prompts "
                  "less chat's, and its chat curve shows what that does to chat."]
    if all(ctl["start"][d] >= 0.9 * ctl["teacher"][d] for d in ctl["domains"]):
        lines += ["", "Every domain started within 90% of its teacher: this run left MOPD nothing to recover, "
                  "and the comparison shows only what each method costs the domains it keeps."]
    return lines + [""]


def write_report(path, title, intro, scores, cols, extra_lines=()):
    """report.md: the scores with SEs, the paired changes, then what the caller adds (timings, the
    teacher registry, the MOPD-vs-control curves)."""
    lines = [f"# {title}", "", intro, "", *score_table(scores, cols), "",
             "Change from the stage before, prompt by prompt: mean difference (z = mean / SE); **bold**: "
             "|z| >= 3.", "", *change_table(scores, cols), "", *extra_lines]
    with open(os.path.join(path, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
