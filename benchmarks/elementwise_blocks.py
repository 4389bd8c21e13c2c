"""Q: does cutting the element-wise generator bank into runs of at most 4M elements pay?

The authors' teacher encoder (6 layers x 512 / 2048) is the element-wise bank of stu1 and
stu2: 18.9M elements. One update of that bank alone (forward, backward of a fixed random
loss, fairseq's Adam step) as one bank against runs of at most
``wd_fairseq.model.ELEMENTWISE_BANK_ELEMENTS`` elements, interleaved, one thread, median
CPU seconds. glibc serves blocks of up to 32 MiB from its heap and maps bigger ones afresh
each time, so the difference is page faults, which cost more on some (virtual) machines.
"""

import argparse
import statistics
import time

import torch
from fairseq.optim.adam import Adam

from common import environment, use_threads, write_results
from wd_fairseq.generator import ElementwiseGenerator
from wd_fairseq.model import ELEMENTWISE_BANK_ELEMENTS, _runs_of_at_most

#: the tensors of one encoder layer of transformer_wmt_en_de
LAYER = [(512, 512), (512,)] * 4 + [(512,), (512,), (2048, 512), (2048,), (512, 2048), (512,),
                                    (512,), (512,)]


def banks(shapes, limit):
    runs = _runs_of_at_most(shapes, limit, lambda shape: torch.Size(shape).numel())
    generators = [ElementwiseGenerator(*run) for run in runs]
    inputs = [torch.tanh(torch.randn(g.scale.numel())) for g in generators]
    weights = [torch.randn(g.scale.numel()) for g in generators]
    params = [p for g in generators for p in g.parameters()]
    return generators, inputs, weights, Adam(params, lr=1e-4, betas=(0.9, 0.98))


def update(generators, inputs, weights, optimizer) -> float:
    start = time.process_time()
    loss = sum((g(x) * w).sum() for g, x, w in zip(generators, inputs, weights))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.process_time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=7)
    parser.add_argument("--output", default="work/bench/results/elementwise_blocks.json")
    args = parser.parse_args()
    use_threads(1)
    shapes = LAYER * 6
    variants = {"one bank": banks(shapes, float("inf")),
                f"runs of <= {ELEMENTWISE_BANK_ELEMENTS} elements": banks(shapes, ELEMENTWISE_BANK_ELEMENTS)}
    times = {name: [] for name in variants}
    for step in range(args.updates + 2):
        for name, variant in variants.items():
            seconds = update(*variant)
            if step >= 2:
                times[name].append(seconds)
    rows = [{"variant": name, "banks": len(variants[name][0]),
             "elements": sum(g.scale.numel() for g in variants[name][0]),
             "update_cpu_s": statistics.median(t), "updates_cpu_s": t} for name, t in times.items()]
    for row in rows:
        print(f"{row['variant']:>32}: {row['banks']} bank(s), {row['elements']:,} elements, "
              f"{row['update_cpu_s'] * 1e3:.0f} ms per update (median of {args.updates})")
    args.workdir, args.quick = None, False
    results = {"benchmark": "elementwise_blocks", "environment": environment("cpu"), "rows": rows}
    print(f"Results: {write_results(args, 'elementwise_blocks', results)}")


if __name__ == "__main__":
    main()
