"""Progress reporting: plain log lines off a terminal, a live bar on one, rates of resumed work."""
import io

from chmr_jax.training.progress import Progress


def test_log_lines_off_a_terminal_end_with_one_final_line():
    out = io.StringIO()
    with Progress(10, "pretrain", unit="step", stream=out, log_every_s=0.0, initial=4) as bar:
        for _ in range(6):
            bar.postfix = "loss 1.2345"
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 6                       # steps 5..9, then the final line once
    assert lines[-1].startswith("pretrain: [########################] 10/10 100.0%")
    assert lines[-1].endswith("loss 1.2345") and "step/s" in lines[-1] and "eta" in lines[-1]
    assert bar.count - bar.initial == 6


def test_terminal_bar_rewrites_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Progress(3, "x", stream=out)
    assert bar.interactive
    bar.update(3)
    bar.close()
    assert out.getvalue().startswith("\r") and out.getvalue().count("\n") == 1
    assert Progress(3, "x", stream=Tty(), interactive=False).interactive is False
