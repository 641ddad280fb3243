"""One training step (forward, domain-balanced loss, backward, Adam) of every multi-domain model on MovieLens-100K
batches of 4,096, with the fused expert ops (`expert_impl="fused"`) and with their loop-of-experts twins over the same
parameters, the two interleaved in one process (alternating order, first step of each dropped), medians of N steps.
Interleaving keeps the two sides under the same machine load; prints one Markdown row per model.

    OMP_NUM_THREADS=1 MBREC_FAST_DATA=../shared/data python benchmarks/ml100k_fused_vs_loop.py [N]
"""
import statistics
import sys
import time

import torch

from mbrec_fast.data.ctr import default_data_root, load_ml100k
from mbrec_fast.models.multidomain import MODEL_NAMES, build_model, ctr_loss


def main(n_steps: int = 20) -> None:
    torch.set_num_threads(1)
    data = load_ml100k(default_data_root() / "ml100k")
    batches = list(data.split((0.8, 0.1, 0.1))[0].batches(4096, seed=0))[:4]
    print("| model | fused ms/step | loop ms/step | loop / fused time |\n|---|---|---|---|")
    for name in MODEL_NAMES:
        runs = {}
        for impl in ("fused", "loop"):
            torch.manual_seed(0)
            model = build_model(name, data, expert_impl=impl)
            runs[impl] = (model, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-5))
        times = {"fused": [], "loop": []}
        for i in range(n_steps + 1):
            for impl in ("fused", "loop") if i % 2 == 0 else ("loop", "fused"):
                model, opt = runs[impl]
                batch = batches[i % len(batches)]
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                ctr_loss("balanced", model(batch), batch, data.n_domains).backward()
                opt.step()
                if i:
                    times[impl].append(time.perf_counter() - t)
        fused, loop = (statistics.median(times[k]) * 1e3 for k in ("fused", "loop"))
        print(f"| {name} | {fused:.0f} | {loop:.0f} | {loop / fused:.2f}× |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
