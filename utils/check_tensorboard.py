#!/usr/bin/env python3
"""Check a run's TensorBoard event files with TensorBoard's own reader.

    pip install tensorboard
    python3 utils/check_tensorboard.py runs/my-run

Reads RUN/events.out.tfevents.* with tensorboard's EventAccumulator (with
purge_orphaned_data=False, so duplicate or out-of-order steps left by a resumed run would
show instead of being hidden) and checks, against RUN/metrics.csv:

- every tag is there: train/{loss,learning_rate,grad_norm,tokens_per_s}, val/loss and
  val/loss/<dataset>, each also as *_by_tokens/... whose step is the token count;
- each tag's steps are strictly increasing (no step twice: one continuous curve);
- the steps are metrics.csv's steps (or tokens), and the values its values (to f32
  precision; tokens_per_s to the CSV's 0.1).

Prints one line per tag and exits 1 on the first problem, naming it.
"""

import csv
import math
import sys
from pathlib import Path

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    sys.exit("check_tensorboard.py: tensorboard is not installed; run `pip install tensorboard`")

COLUMNS = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_loss": "val/loss",
}


def by_tokens(tag):
    top, rest = tag.split("/", 1)
    return f"{top}_by_tokens/{rest}"


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: check_tensorboard.py RUN_DIR")
    run = Path(sys.argv[1])
    files = sorted(run.glob("events.out.tfevents.*"))
    if not files:
        fail(f"{run}: no events.out.tfevents.* file; train with --logger csv,tensorboard")
    metrics = run / "metrics.csv"
    if not metrics.exists():
        fail(f"{metrics} is missing")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    print(f"{run}: {len(files)} event file(s), {len(tags)} scalar tags, {len(rows)} rows in metrics.csv")

    columns = dict(COLUMNS)
    for name in rows[0].keys() if rows else []:
        if name.startswith("val_loss/"):
            columns[name] = "val/loss/" + name[len("val_loss/"):]
    expected = set(columns.values()) | {by_tokens(t) for t in columns.values()}
    if tags != expected:
        fail(f"tags: missing {sorted(expected - tags)}, unexpected {sorted(tags - expected)}")

    for column, tag in columns.items():
        want = [(int(r["step"]), int(r["tokens"]), float(r[column])) for r in rows if r[column] != ""]
        for t, axis in [(tag, 0), (by_tokens(tag), 1)]:
            got = [(e.step, e.value) for e in acc.Scalars(t)]
            steps = [s for s, _ in got]
            dup = sorted({s for s in steps if steps.count(s) > 1})
            if dup:
                fail(f"{t}: steps {dup[:5]} appear more than once")
            if any(a >= b for a, b in zip(steps, steps[1:])):
                fail(f"{t}: steps are not increasing: {steps}")
            want_steps = [w[axis] for w in want]
            if steps != want_steps:
                fail(f"{t}: steps {steps[:8]}... differ from metrics.csv's {want_steps[:8]}...")
            tol = 0.051 if column == "tokens_per_s" else 0.0
            worst = 0.0
            for (s, v), w in zip(got, want):
                expect = w[2]
                if math.isnan(expect) and math.isnan(v):
                    continue
                diff = abs(v - expect)
                if diff > tol + 1e-6 * abs(expect):
                    fail(f"{t} at step {s}: {v} in the event files, {expect} in metrics.csv")
                worst = max(worst, diff)
            span = f"{steps[0]}..{steps[-1]}" if steps else "-"
            print(f"ok {t:34} {len(steps):5} values, steps {span}, max |diff| {worst:.2e}")
    print(f"OK: every tag is one continuous curve matching {metrics}")


if __name__ == "__main__":
    main()
