"""Progress in a log: periodic one-line summaries instead of one line per bar refresh."""
import io
import subprocess
import sys

from memtune.progress import Progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_summary_every_30_seconds_with_rate_and_eta():
    clock, log = FakeClock(), io.StringIO()
    bar = Progress(1000, "lora", items_per_update=16, every_fraction=None, stream=log, clock=clock)
    for i in range(1000):
        clock.t = (i + 1) / 10                           # 10 steps/s
        bar.update(loss=0.5)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4, lines                        # at 30, 60, 90 s and the final state
    assert lines[0] == "lora: step 300/1000 (30 %), loss 0.5000, 160.0 samples/s, 0:00:30 elapsed, ETA 0:01:10"
    assert lines[-1] == "lora: step 1000/1000 (100 %), loss 0.5000, 160.0 samples/s, 0:01:40 elapsed"


def test_a_summary_at_every_tenth_of_a_fast_run_and_none_when_disabled():
    clock, log = FakeClock(), io.StringIO()
    bar = Progress(50, "eval", unit="batch", stream=log, clock=clock)
    for i in range(50):
        clock.t = (i + 1) / 100
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"eval: batch {n}/50 ({2 * n} %)" for n in range(5, 51, 5)]
    quiet = io.StringIO()
    off = Progress(50, "eval", enabled=False, stream=quiet, clock=clock)
    for _ in range(50):
        off.update()
    off.close()
    assert quiet.getvalue() == ""


def test_a_training_log_stays_short(tmp_path):
    csv = tmp_path / "task.csv"
    csv.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} text {i},{i % 2}\n" for i in range(40)))
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "memtune", "train", "--model", "tiny-bert", "--task", f"csv:{csv}",
                               "--method", "lora", "--max-steps", "150", "--batch-size", "4", "--max-length", "16",
                               "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=err, text=True)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    lines = text.splitlines()
    train_lines = [ln for ln in lines if ln.startswith("lora: step")]
    # One line per tenth of the run (150 steps: every 15), plus one per 30 s for a slow machine, plus eval's.
    assert [ln.split(" (")[0] for ln in train_lines][:10] == [f"lora: step {n}/150" for n in range(15, 151, 15)]
    assert "\r" not in text and len(lines) <= 10 + 4 + 2, lines
