"""Progress reporting (tqdm): plain log lines off a terminal, a live bar on one, rates of resumed
work and after a restarted clock."""
import io
import re

from chmr_jax.progress import Progress


def test_log_lines_off_a_terminal_end_with_one_final_line():
    out = io.StringIO()
    with Progress(10, "pretrain", unit="step", stream=out, log_every_s=0.0, initial=4) as bar:
        for _ in range(6):
            bar.postfix = "loss 1.2345"
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 6                       # steps 5..9, then the final line once
    assert [int(re.search(r"(\d+)/10", line).group(1)) for line in lines] == [5, 6, 7, 8, 9, 10]
    assert lines[-1].startswith("pretrain: 100%") and lines[-1].endswith("loss 1.2345]")
    assert "step/s" in lines[-1]
    assert bar.count - bar.initial == 6
    off = Progress(10, "pretrain", unit="step", stream=io.StringIO(), log_every_s=1e9)
    off.restart_clock(1)          # as the training loop calls it: after step 1 (compiling), before its update
    off.update(10)
    assert off.count == 10 and off.initial == 1      # (a first version counted 11 of 10 here)


def test_rate_counts_only_the_work_after_the_clock_restarts(monkeypatch):
    import time
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = Progress(100, "pretrain", unit="step", stream=out, log_every_s=1e9)
    bar.update(1)                 # a slow first step (compilation)...
    now[0] += 50.0
    bar.restart_clock()           # ...is left out of the rate: 10 steps in 5 s = 2 step/s
    bar.update(10)
    now[0] += 5.0
    assert "2.00step/s" in bar.line() and "11/100" in bar.line()
    assert "00:44" in bar.line()  # 89 steps left at 2 step/s


def test_terminal_bar_rewrites_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Progress(3, "x", stream=out)
    assert bar.interactive
    bar.update(3)
    bar.close()
    assert "\r" in out.getvalue() and out.getvalue().count("\n") == 1 and "3/3" in out.getvalue()
    assert Progress(3, "x", stream=Tty(), interactive=False).interactive is False


def test_a_live_bar_keeps_one_count_across_a_clock_restart():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Progress(10, "pretrain", unit="step", stream=out, initial=2)
    bar.update(3)
    bar.restart_clock()           # after compilation: the 5 done so far are left out of the rate
    bar.update(2)
    assert bar.count == bar._bar.n == 7 and bar.initial == 5
    bar.restart_clock(8)          # the training loop's form: the rate counts from step 8 on; the count stays
    assert bar.count == bar._bar.n == 7 and bar.initial == 8
    bar.update(1)
    bar.close()
    assert "8/10" in out.getvalue().split("\r")[-1]


def test_progress_line_and_summary_show_the_same_utilisation(tmp_path, monkeypatch):
    """Issue 36: on a 3-step run the progress line said 42% of the matmul rate and the summary 23.6%:
    the summary's clock ran on through the final checkpoint's save. Both now measure the steady steps up
    to the last logged step (a fake clock: 1 s per step, then 10 s of saving)."""
    from chmr_jax.training import chores as chores_lib
    now = {"t": 0.0}
    monkeypatch.setattr(chores_lib.time, "perf_counter", lambda: now["t"])
    c = chores_lib.Chores(tmp_path, total=3, start=0, saved_totals=None, is_main=False, t_start=0.0,
                          matmul_rate=10e9)
    c.step_flops = 2e9
    shown = []
    for step in (1, 2, 3):
        now["t"] = float(step)           # each step's metrics fetched 1 s after the previous step's
        c.step_done(step, 16, metrics={"loss": 1.0})
        shown.append(c.bar.postfix)
    now["t"] = 13.0                      # the final checkpoint saved: 10 s later the summary is written
    summary = c.summary()
    assert summary["utilisation"] == 0.2      # 2 GFLOP x 2 steady steps in 2 s against 10 GFLOP/s
    assert shown[-1] == f"loss 1.0000, {summary['utilisation']:.0%} of matmul rate", (shown, summary)
