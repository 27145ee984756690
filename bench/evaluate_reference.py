"""perceiver-io's side of bench/evaluate.py; runs in the reference venv (../shared/reference/setup-reference.sh).

    /tmp/ref-venv/bin/python bench/evaluate_reference.py MODEL_DIR WINDOWS.npz [--threads 2] [--cores 0,1]

MODEL_DIR: an HF directory perceiver-io's `PerceiverCausalLanguageModel.from_pretrained` loads (our export of the
benchmarked parameters). WINDOWS.npz: the batches of windows our evaluate runs (input_ids, pad_mask (steps, batch,
W), labels, weights (steps, batch, n), prefix_len). Each run does, for every batch, the model's forward under
torch.no_grad() (`backend_model(x, prefix_len=, pad_mask=)`, as bench_torch.py's "forward") and the cross-entropy
of the scored latents. It loads and warms up, prints `ready`, then runs one pass over all batches for every
`pass` line on stdin and answers with a JSON line: the pass's seconds and summed loss (for the parity check). So
bench/evaluate.py can alternate our passes and the reference's: both see the machine in the same state.
"""

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cores", default=None, help="comma-separated CPU ids to pin this process to")
    args = ap.parse_args()
    if args.cores:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from perceiver.model.text.clm import PerceiverCausalLanguageModel

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    model = PerceiverCausalLanguageModel.from_pretrained(args.model_dir).backend_model.eval()
    data = np.load(args.windows)
    prefix_len = int(data["prefix_len"])
    batches = [tuple(torch.from_numpy(np.ascontiguousarray(data[k][i])) for k in
                     ("input_ids", "pad_mask", "labels", "weights")) for i in range(len(data["input_ids"]))]
    batches = [(x.long(), pad, labels.long(), weights) for x, pad, labels, weights in batches]

    def score(batch):
        x, pad_mask, labels, weights = batch
        with torch.no_grad():
            logits = model(x, prefix_len=prefix_len, pad_mask=pad_mask).logits
            losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            return float(losses[weights].double().sum())

    score(batches[0])  # warm-up
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "affinity": sorted(os.sched_getaffinity(0))}
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "pass":
            break
        t0 = time.perf_counter()
        loss_sum = sum(score(b) for b in batches)
        print(json.dumps({"seconds": time.perf_counter() - t0, "loss_sum": loss_sum}), flush=True)


if __name__ == "__main__":
    main()
