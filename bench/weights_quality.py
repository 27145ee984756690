"""How close bfloat16 and int8 decode-time weights stay to float32, on a trained model and text it did not train on.

    python bench/weights_quality.py [--model workdir-demo] [--corpus workdir-demo/corpus] [--windows 64]

The model: a training workdir or model directory (default: the offline demo's, `python -m perceiver_ar_jax.demo`);
the text: the documents that training held out (data.hold_out of the corpus with the workdir's eval_fraction),
cut into windows of max_seq_len tokens scored at their max_latents latent positions. For each weight format the
model's next-token distributions are compared with float32's: mean KL(float32 || format) in nats and the share of
positions where the most likely token is the same (top-1 agreement).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="workdir-demo")
    ap.add_argument("--corpus", default=None, help="text files (default: MODEL/corpus)")
    ap.add_argument("--windows", type=int, default=64, help="windows of held-out text to score")
    ap.add_argument("--json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from perceiver_ar_jax.checkpoints import load_model
    from perceiver_ar_jax.data import hold_out, load_text_documents
    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.model.weights import prepare_weights
    from perceiver_ar_jax.tokenizer import Tokenizer

    config, params = load_model(args.model)
    tokenizer = Tokenizer.from_pretrained(args.model)
    train_config = json.loads((Path(args.model) / "train_config.json").read_text())
    documents = load_text_documents(args.corpus or str(Path(args.model) / "corpus"))
    _, held_out = hold_out(documents, train_config["data"]["eval_fraction"])
    stream = []
    for text in held_out:
        stream += [tokenizer.eos_id] + tokenizer.encode(text)
    length = config.max_seq_len
    count = min(args.windows, len(stream) // length)
    ids = np.asarray(stream[: count * length], np.int32).reshape(count, length)
    model = CausalLanguageModel(config)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, prefix_len=config.max_prefix_len))

    def distributions(p):
        return jnp.concatenate([jax.nn.log_softmax(forward(p, ids[i:i + 8])) for i in range(0, count, 8)])

    reference = distributions(params)
    results = {"model": args.model, "windows": count, "positions": int(reference.shape[0] * reference.shape[1])}
    for weights in ("bfloat16", "int8"):
        log_q = distributions(prepare_weights(params, weights))
        kl = jnp.sum(jnp.exp(reference) * (reference - log_q), axis=-1)
        agree = jnp.argmax(reference, -1) == jnp.argmax(log_q, -1)
        results[weights] = dict(mean_kl_nats=float(jnp.mean(kl)), top1_agreement=float(jnp.mean(agree)))
        print(f"{weights:8s}: mean KL(float32 || {weights}) {float(jnp.mean(kl)):.2e} nats, top-1 agreement "
              f"{float(jnp.mean(agree)):.2%} over {results['positions']} positions of held-out text", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
