"""Step progress: a tqdm bar on a terminal, a plain line every few seconds elsewhere (CI, nohup, docker logs)."""

import io

from transferkit.training.metrics_log import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    bar = progress_bar(total=3, desc="epoch 1/1", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_a_pipe_gets_whole_lines_at_most_every_interval():
    out = io.StringIO()
    bar = progress_bar(total=400, initial=100, desc="epoch 2/3", file=out, interval=0.0)
    assert isinstance(bar, LineProgress)
    bar.set_postfix(loss="0.512", acc="0.810")
    bar.update(1)
    bar.close()
    assert out.getvalue() == "epoch 2/3: step 101/400 (25%)  loss 0.512 acc 0.810\n"

    quiet = io.StringIO()
    bar = progress_bar(total=400, desc="epoch 1/3", file=quiet, interval=3600.0)
    for _ in range(400):
        bar.update(1)
    bar.close()
    assert quiet.getvalue() == ""  # the trainer's own end-of-epoch line is the one line per epoch

    hidden = io.StringIO()
    bar = progress_bar(total=4, desc="epoch 1/1", file=hidden, interval=0.0, disable=True)  # not rank 0
    bar.update(4)
    assert hidden.getvalue() == ""
