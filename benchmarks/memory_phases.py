"""Where the demo's memory goes: resident memory (RSS) before, at its peak during, and after each
phase of `tunelab demo`, sampled every 20 ms in a thread.

    PYTHONPATH=src python benchmarks/memory_phases.py                       # the demo as users run it
    PYTHONPATH=src python benchmarks/memory_phases.py --examples 300 --max-steps 8 --eval-limit 32

Runs the demo itself (tunelab.demo.run_demo) with its phases wrapped: the data check and encoding,
the set-up, every held-out loss during training, each step's forward/backward and optimizer step,
saving, then evaluation's model loads, generation per contender, held-out loss and forgetting
check. A phase nested in another is indented. Steps past the first four print only when the RSS
after them is the highest yet. The process's peak from getrusage (ru_maxrss, what the demo
prints) closes the table. Memory does not depend on the machine's load; time does, so none is
printed.

`--batch-size`, `--grad-accum` and `--checkpoint-every` change the demo's training to measure a
lever against it, e.g. the same 8 examples a step as two micro-batches of 4:

    PYTHONPATH=src python benchmarks/memory_phases.py --train-only --max-steps 20 --batch-size 4 --grad-accum 2

`--no-recompute` trains as `tunelab train` does by default (no activations recomputed), and
`--cap SETTLE SLACK_MIB SHARE` measures a candidate rule for training's heap cap; the steps after
which it trimmed print at the end:

    PYTHONPATH=src python benchmarks/memory_phases.py --train-only --max-steps 40 --no-recompute --cap 8 256 0.15

`--relevel` adds to the rule: a step that began from a trimmed heap raises the level to its RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GIB = 1024**3
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler(threading.Thread):
    """Reads the RSS every `interval` s and raises the peak of every open phase."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.open, self.lock = interval, [], threading.Lock()

    def run(self) -> None:
        while True:
            now = rss()
            with self.lock:
                for phase in self.open:
                    phase["peak"] = max(phase["peak"], now)
            time.sleep(self.interval)

    @contextlib.contextmanager
    def phase(self, name: str, show=lambda phase: True):
        now = rss()
        phase = {"name": name, "before": now, "peak": now, "depth": len(self.open)}
        with self.lock:
            self.open.append(phase)
        try:
            yield phase
        finally:
            phase["after"] = rss()
            with self.lock:
                self.open.remove(phase)
                for outer in self.open:
                    outer["peak"] = max(outer["peak"], phase["peak"], phase["after"])
            phase["peak"] = max(phase["peak"], phase["after"])
            if show(phase):
                print(f"{'  ' * phase['depth']}{phase['name']:<{52 - 2 * phase['depth']}} "
                      f"{phase['before'] / GIB:6.2f} {phase['peak'] / GIB:6.2f} {phase['after'] / GIB:6.2f}",
                      file=sys.__stdout__, flush=True)


def wrap(sampler: Sampler, owner, attribute: str, name, show=None) -> None:
    """Replace owner.attribute by the same function run inside a phase; `name` may be a function
    of the call's arguments."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        label = name(*args, **kwargs) if callable(name) else name
        with sampler.phase(label, show or (lambda phase: True)):
            return original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def instrument(sampler: Sampler, trimmed: list[int]) -> None:
    """Wrap the demo's phases; the steps after which training trimmed the heap go to `trimmed`."""
    from tunelab import device
    from tunelab.evaluate import core, forgetting
    from tunelab.run import Run
    from tunelab.train import loop

    steps = {"n": 0, "highest": 0}

    def step_shown(phase) -> bool:
        shown = steps["n"] <= 4 or phase["after"] > steps["highest"]
        steps["highest"] = max(steps["highest"], phase["after"])
        return shown

    def step_name(*args, **kwargs):
        steps["n"] += 1
        return f"step {steps['n']}: forward and backward"

    wrap(sampler, loop, "prepare", "data check and encoding (prepare)")
    wrap(sampler, loop, "run_loop", "training loop (run_loop)")
    wrap(sampler, loop, "save_final", "saving the weights")
    wrap(sampler, loop, "evaluate", lambda training, step, *a, **k: f"held-out loss at step {step}")
    wrap(sampler, loop, "backward_step", step_name, show=step_shown)
    original_set_up = loop.set_up

    def set_up(*args, **kwargs):
        with sampler.phase("model and optimizer set up (set_up)"):
            training = original_set_up(*args, **kwargs)
        inner = training.optimizer.optimizer  # accelerate's wrapper calls this one's step
        wrap(sampler, inner, "step", lambda *a, **k: f"step {steps['n']}: optimizer step", show=step_shown)
        return training

    loop.set_up = set_up
    after_step = device.FreedMemoryCap.after_step

    def counted(cap):
        trims = cap.trims
        after_step(cap)
        if cap.trims > trims:
            trimmed.append(steps["n"])

    device.FreedMemoryCap.after_step = counted
    wrap(sampler, Run, "evaluate", "evaluation (Run.evaluate)")
    wrap(sampler, Run, "base_model", "eval: base model loaded")
    wrap(sampler, Run, "model", "eval: tuned model loaded")
    wrap(sampler, core, "_generate", lambda model, template, prompts, n, b, contender, *a, **k:
         f"eval: {contender.name} answers ({len(prompts)})")
    wrap(sampler, core, "heldout_loss", "eval: held-out loss")
    wrap(sampler, forgetting, "accuracy", "eval: forgetting check")


def measure_cap_rule(device, settle: int, slack: int, share: float, relevel: bool = False) -> None:
    """Replace the heap cap's rule (device.FreedMemoryCap.after_step) by a candidate's: the level is
    the highest RSS over the first `settle` steps, the heap trimmed once the RSS after a step is
    more than max(`slack`, `share` of the level) above it. With `relevel`, a step that began from
    a trimmed heap raises the level to its own RSS (what it needs, without the gaps a grown heap
    holds) and is not trimmed after."""

    def after_step(cap) -> None:
        if cap.libc is None:
            return
        cap.steps += 1
        now = device.resident_bytes()
        from_trimmed, cap.from_trimmed = getattr(cap, "from_trimmed", False), False
        if cap.steps <= settle or (relevel and from_trimmed):
            cap.level = max(cap.level, now)
        elif now > cap.level + max(slack, int(share * cap.level)):
            cap.libc.malloc_trim(0)
            cap.trims += 1
            cap.from_trimmed = True

    device.FreedMemoryCap.after_step = after_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1200, help="generated examples (the demo's: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=100, help="training steps (the demo's: %(default)s)")
    parser.add_argument("--eval-limit", type=int, default=100, help="held-out examples evaluated (%(default)s)")
    parser.add_argument("--method", default="full", choices=("full", "lora"))
    parser.add_argument("--out", default="runs/memory-phases/demo", help="run folder (overwritten)")
    parser.add_argument("--train-only", action="store_true", help="the demo's training alone, no evaluation")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (default: the demo's)")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: the demo's)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="recompute the activations of every N-th decoder layer only (a measurement, "
                        "not a tunelab option)")
    parser.add_argument("--no-recompute", action="store_true",
                        help="no activations recomputed: tunelab train's default (the demo recomputes them)")
    parser.add_argument("--cap", type=float, nargs=3, metavar=("SETTLE", "SLACK_MIB", "SHARE"),
                        help="a heap cap rule to measure instead of device.FreedMemoryCap's: the level is the "
                        "highest RSS over the first SETTLE steps, trimmed past it + max(SLACK_MIB, SHARE of it)")
    parser.add_argument("--relevel", action="store_true",
                        help="with the cap's rule (or --cap's): a step that began from a trimmed heap raises the "
                        "level to its RSS")
    args = parser.parse_args()
    from tunelab import device

    if args.relevel and not args.cap:
        settle, slack = device.FreedMemoryCap.__init__.__defaults__
        args.cap = (settle, slack >> 20, 0)
    if args.cap:
        measure_cap_rule(device, int(args.cap[0]), int(args.cap[1]) << 20, args.cap[2], args.relevel)

    sampler = Sampler()
    sampler.start()
    print(f"{'phase':<52} {'before':>6} {'peak':>6} {'after':>6}   (RSS, GiB)", flush=True)
    import tunelab.demo
    from tunelab.demo import run_demo, write_dataset
    from tunelab.train.loop import train

    demo_config = tunelab.demo.demo_config
    changed = {k: v for k, v in (("batch_size", args.batch_size), ("grad_accum", args.grad_accum)) if v}
    if args.checkpoint_every:
        changed["gradient_checkpointing"] = True
        prepare_model = device.prepare_model

        def every_nth(model, gradient_checkpointing=False, *rest, **kwargs):
            model = prepare_model(model, False, *rest, **kwargs)
            model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=args.checkpoint_every)
            return model

        device.prepare_model = every_nth
    if args.no_recompute:
        changed["gradient_checkpointing"] = False
    if changed:  # run_demo reads demo_config from its module
        tunelab.demo.demo_config = lambda *a, **k: demo_config(*a, **k).model_copy(update=changed)
    config = tunelab.demo.demo_config(args.method, args.max_steps)
    recomputed = f"every {args.checkpoint_every}. layer" if args.checkpoint_every else config.gradient_checkpointing
    print(f"micro-batches of {config.batch_size} examples, {config.grad_accum} per step, "
          f"activations recomputed: {recomputed}", flush=True)
    settle, slack = device.FreedMemoryCap.__init__.__defaults__
    settle, slack, share = args.cap or (settle, slack >> 20, 0)
    print(f"heap cap: level over the first {settle:.0f} steps{' and steps from a trimmed heap' * args.relevel}, "
          f"trimmed past it + max({slack:.0f} MiB, {share:.0%} of it)", flush=True)
    trimmed = []
    instrument(sampler, trimmed)
    out = Path(args.out)
    name = "the demo's training (train)" if args.train_only else "the whole demo (run_demo)"
    with contextlib.redirect_stdout(sys.stderr), sampler.phase(name, lambda p: False) as whole:
        if args.train_only:
            data = write_dataset(out.parent / f"{out.name}-data" / "bookings.jsonl", args.examples)
            train(config, data, out, overwrite=True)
        else:
            run_demo(out, examples=args.examples, method=args.method, max_steps=args.max_steps,
                     eval_limit=args.eval_limit)
    print(f"{name:<52} {whole['before'] / GIB:6.2f} {whole['peak'] / GIB:6.2f} {whole['after'] / GIB:6.2f}",
          file=sys.__stdout__)
    print(f"heap trimmed by training's cap after {len(trimmed)} step(s): {trimmed}", file=sys.__stdout__)
    print(f"peak RSS of the process (getrusage ru_maxrss): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB", file=sys.__stdout__)


if __name__ == "__main__":
    main()
