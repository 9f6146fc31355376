"""A training step on a CPU that another program is using: tunelab's thread rule against all cores.

    PYTHONPATH=src python benchmarks/busy_cpu.py                    # 1 competing process
    PYTHONPATH=src python benchmarks/busy_cpu.py --competitors 2 --steps 4

torch splits every op over its threads and waits for the slowest; a thread on a core that
another program holds stalls each op. This script times tunelab's training step (SmolLM2-135M,
--batch booking examples packed into one row, bf16 where the CPU computes it natively, AdamW)
in fresh processes:

- quiet, all cores (the old rule: one thread per usable core);
- quiet, one thread per core that the competitors leave free: the reference, what the free
  cores can do;
- with --competitors processes burning a core each (a Python busy loop), all cores;
- the same, with tunelab's rule (`device.configure_threads`, measuring the free cores itself).

It prints each one's median step (the first step left out) and the ratios to the reference
measured in the same run; the goal is no worse than 1.2x with the rule. The machine's own load
(other users) counts against every row alike, so it is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

BURN = "while True: pass"


def child(threads: str, steps: int, batch: int, base: str) -> dict:
    """Time `steps` training steps with `threads` ("rule", "all" or a count) in this process."""
    import torch

    from tunelab import device

    if threads == "rule":
        used = device.configure_threads()
    else:
        used = device.configure_threads(device.usable_cores() if threads == "all" else int(threads))
    from tunelab.config import TrainConfig
    from tunelab.data.load import Example
    from tunelab.demo import bookings
    from tunelab.encoding import encode_examples
    from tunelab.models import load_tokenizer, resolve_base
    from tunelab.template import Template
    from tunelab.train.batching import pack
    from tunelab.train.loop import build_model
    from tunelab.train.loss import token_loss

    path = resolve_base(base)
    template = Template.for_model(load_tokenizer(path))
    rows = bookings.make_examples(batch * steps)
    examples = [Example([{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r["completion"]}], i) for i, r in enumerate(rows)]
    encoded = encode_examples(examples, template, 1024)[0]
    torch.manual_seed(0)
    model = device.prepare_model(build_model(TrainConfig(method="full"), path))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = device.make_optimizer(params, 1e-4, 0.0, torch.device("cpu"))
    bf16 = device.native_bf16(torch.device("cpu"))
    times = []
    with device.reuse_freed_memory():
        for step in range(steps):
            batch_rows = pack(encoded[step * batch:(step + 1) * batch])
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = token_loss(model, batch_rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - started)
    steady = sorted(times[1:])
    return {"threads": used, "median_s": steady[len(steady) // 2], "min_s": steady[0], "bf16": bf16}


def measure(threads: str, args, competitors: int) -> dict:
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(competitors)]
    try:
        time.sleep(1.0 if burners else 0)  # let them take their cores before the rule looks
        command = [sys.executable, __file__, "--child", threads, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--base", args.base]
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--competitors", type=int, default=1, help="processes burning a core each")
    parser.add_argument("--steps", type=int, default=4, help="steps per measurement (the first is left out)")
    parser.add_argument("--batch", type=int, default=4, help="examples per step")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.base)))
        return
    from tunelab.device import usable_cores

    cores = usable_cores()
    free = max(1, cores - args.competitors)
    print(f"{cores} usable cores, {args.competitors} competing process(es), {args.batch} examples a step, "
          f"{args.steps} steps; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = [("quiet, all cores", "all", 0), (f"quiet, {free} thread(s): reference", str(free), 0),
            ("busy, all cores (old rule)", "all", args.competitors), ("busy, tunelab's rule", "rule", args.competitors)]
    results = {}
    print(f"{'':<32} {'threads':>7} {'median s':>9} {'min s':>7} {'x reference':>11}")
    for label, threads, competitors in rows:
        results[label] = r = measure(threads, args, competitors)
        reference = results.get(rows[1][0])
        ratio = f"{r['median_s'] / reference['median_s']:.2f}" if reference else ""
        print(f"{label:<32} {r['threads']:>7} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {ratio:>11}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
