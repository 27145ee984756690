"""Long-document evaluation: which window scores which token, every token once, each loss equal to the model's own
forward pass over that token's context, the totals, bits per byte, and the packing of documents into batches."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.evaluation import WindowSpec, evaluate
from perceiver_ar_jax.evaluation.results import bucket_range, context_bucket
from perceiver_ar_jax.evaluation.windows import first_scored_positions, make_rows, window_ends
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig

# max_prefix_len 12; with 3 latents a window is 15 tokens, with 4 it is 16
SMALL = dict(vocab_size=61, max_seq_len=16, max_latents=4, num_channels=32, num_heads=2, num_self_attention_layers=2,
             output_norm=True, cross_attention_dropout=0.0)
BOS = 1


def noisy_params(config: CausalLanguageModelConfig, seed: int = 0):
    """Random params with large values, so that logits vary strongly and every parameter matters."""
    params = nn.unbox(CausalLanguageModel(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32),
                                                       prefix_len=0)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + jax.random.normal(k, leaf.shape) * (0.3 if leaf.ndim == 1 else
                                                                                  leaf.shape[0] ** -0.5)
                                        for leaf, k in zip(leaves, keys, strict=True)])


def small_model(abs_pos_emb: bool):
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos_emb)
    return CausalLanguageModel(config), noisy_params(config)


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, SMALL["vocab_size"], n).tolist() for n in lengths]


def forward_losses(model, params, context, prefix_len):
    """Cross-entropy of every latent of one unpadded forward pass over `context` (labels: context shifted)."""
    logits = model.apply({"params": params}, jnp.asarray([context[:-1]]), prefix_len=prefix_len)[0]
    labels = np.asarray(context[prefix_len + 1:])
    return np.asarray(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])


def independent_losses(model, params, tokens, spec):
    """Per-position losses from the windows rule of windows.py, one unpadded forward pass per window: the first
    window in blocks of n (block e = the document's first e tokens, prefix e - n), then windows of W tokens whose
    last `stride` are new. No padding, fillers or batching."""
    num_positions, w, n = len(tokens) - 1, spec.window, spec.num_latents
    losses, scored = np.full(num_positions, np.nan), 0
    ends = [min(e, w) for e in range(n, w + n, n)] + list(range(w + spec.stride, num_positions + spec.stride,
                                                                 spec.stride))
    for e in ends:
        if scored >= num_positions:
            break
        start, stop = max(0, e - w), min(e, num_positions)
        window = forward_losses(model, params, tokens[start:stop + 1], prefix_len=(e - n) - start)
        losses[scored:stop] = window[len(window) - (stop - scored):]
        scored = stop
    return losses


# ---------------------------------------------------------------------------------------------------- the windows
@pytest.mark.parametrize("window,num_latents,stride", [(6, 3, 2), (16, 4, 4), (16, 4, 1), (15, 3, 3), (10, 4, 3),
                                                       (4, 4, 4), (4, 4, 1), (9, 2, 1), (228, 100, 7)])
def test_every_token_is_scored_exactly_once_for_any_stride(window, num_latents, stride):
    spec = WindowSpec(window, num_latents, stride)
    for num_positions in sorted({1, 2, num_latents - 1, num_latents, num_latents + 1, window - 1, window,
                                 window + 1, window + stride, 3 * window + 5} - {0}):
        tokens = np.arange(num_positions + 1) + 100
        ends = window_ends(num_positions, spec)
        rows = make_rows(tokens, ends, spec, pad_id=0)
        latent_pos = ends[:, None] - num_latents + np.arange(num_latents)[None, :]
        scored = np.sort(latent_pos[rows.weights])
        np.testing.assert_array_equal(scored, np.arange(num_positions))  # each position once, nothing else
        # the scored latents hold the token at that position and its label is the next one
        pos, ctx = latent_pos[rows.weights], rows.context[rows.weights]
        np.testing.assert_array_equal(rows.input_ids[:, spec.prefix_len:][rows.weights], tokens[pos])
        np.testing.assert_array_equal(rows.labels[rows.weights], tokens[pos + 1])
        # context: everything before in the first window, W - stride + 1 .. W tokens after it
        np.testing.assert_array_equal(ctx[pos < window], pos[pos < window] + 1)
        assert np.all((ctx[pos >= window] >= window - stride + 1) & (ctx[pos >= window] <= window))
        # no latent is a pad (perceiver-io's self-attention has no pad mask); pads only on the left
        assert not rows.pad_mask[:, spec.prefix_len:].any()
        assert np.all(np.diff(rows.pad_mask.astype(int), axis=1) <= 0)
        np.testing.assert_array_equal(first_scored_positions(ends, spec), np.concatenate([[0], ends[:-1]]))


def test_window_spec_checks_its_flags():
    assert WindowSpec.for_model(1024, 512) == WindowSpec(1024, 512, 512)
    assert WindowSpec.for_model(1024, 512, num_latents=128, stride=32) == WindowSpec(640, 128, 32)
    with pytest.raises(ValueError, match=r"stride=129 is out of range: must be in \[1, 128\]"):
        WindowSpec.for_model(1024, 512, num_latents=128, stride=129)
    with pytest.raises(ValueError, match=r"num_latents=0 is out of range: must be in \[1, 512\]"):
        WindowSpec.for_model(1024, 512, num_latents=0)


def test_context_buckets_are_powers_of_two():
    np.testing.assert_array_equal(context_bucket(np.array([1, 2, 3, 4, 5, 8, 9, 1024, 1025])),
                                  [0, 1, 2, 2, 3, 3, 4, 10, 11])
    assert [bucket_range(b) for b in (0, 1, 2, 3, 10)] == [(1, 1), (2, 2), (3, 4), (5, 8), (513, 1024)]


# ---------------------------------------------------------------------------------------------------- the losses
def test_stride_1_losses_equal_a_forward_pass_per_position():
    model, params = small_model(abs_pos_emb=False)
    (doc,) = documents([28])
    result = evaluate(model, params, [doc], num_latents=3, stride=1, bos_id=BOS, batch_size=4)
    tokens, w, n = [BOS, *doc], 15, 3
    expected = []
    for i in range(len(doc)):  # position i predicts tokens[i + 1]
        if i < w:  # first window: all i + 1 tokens, prefix = the start of i's block of n latents
            context, prefix_len = tokens[: i + 2], min(n * (i // n), w - n)
        else:  # one window of W tokens ending at i
            context, prefix_len = tokens[i + 1 - w: i + 2], w - n
        expected.append(forward_losses(model, params, context, prefix_len)[-1])
    scored = result.documents[0]
    np.testing.assert_allclose(scored.token_losses, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(scored.token_contexts, np.minimum(np.arange(1, len(doc) + 1), w))


def test_document_loss_is_the_sum_of_independently_computed_token_losses():
    """Several documents of different lengths packed into batches of 3 windows (short ones share a batch, long
    ones spread over several), absolute position embedding on: each document's losses equal the model's forward
    passes over its windows, unpadded; the total is their sum."""
    model, params = small_model(abs_pos_emb=True)
    docs = documents([1, 5, 23, 37, 3, 16])
    spec = WindowSpec.for_model(16, 4, stride=3)
    result = evaluate(model, params, docs, stride=3, bos_id=BOS, batch_size=3)
    assert [d.num_tokens for d in result.documents] == [len(d) for d in docs] and result.num_tokens == 85
    for doc, scored in zip(docs, result.documents, strict=True):
        expected = independent_losses(model, params, [BOS, *doc], spec)
        np.testing.assert_allclose(scored.token_losses, expected, rtol=2e-5, atol=2e-5)
        assert scored.loss_sum == pytest.approx(expected.sum(), rel=1e-5)
        assert scored.loglikelihood == -scored.loss_sum
    assert result.loss_sum == pytest.approx(sum(d.loss_sum for d in result.documents), rel=1e-12)
    assert result.metrics()["loss"] == pytest.approx(result.loss_sum / 85)
    assert int(result.bucket_tokens.sum()) == 85
    assert result.bucket_loss_sums.sum() == pytest.approx(result.loss_sum, rel=1e-6)
    # a token's loss depends only on what comes before it: a shortened document keeps its losses
    (short,) = evaluate(model, params, [docs[3][:30]], stride=3, bos_id=BOS, batch_size=3).documents
    np.testing.assert_allclose(short.token_losses, result.documents[3].token_losses[:30], rtol=2e-5, atol=2e-5)


def test_without_a_context_token_the_first_token_is_not_scored():
    model, params = small_model(abs_pos_emb=False)
    docs = documents([9, 1])
    result = evaluate(model, params, docs, bos_id=None)
    assert [d.num_tokens for d in result.documents] == [8, 0] and result.num_bytes is None
    np.testing.assert_allclose(result.documents[0].token_losses,
                               independent_losses(model, params, docs[0], WindowSpec.for_model(16, 4)),
                               rtol=2e-5, atol=2e-5)


class WordTokenizer:
    """One id per whitespace-separated word: enough to check bits per byte by hand."""

    eos_id, pad_id = 1, 0

    def __init__(self):
        self.ids = {}

    def encode_many(self, texts):
        return [[self.ids.setdefault(word, 2 + len(self.ids)) for word in text.split()] for text in texts]


def test_bits_per_byte_on_a_hand_computed_case():
    """All-zero parameters give uniform logits: every token costs ln 61 nats = log2 61 bits."""
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=False)
    model = CausalLanguageModel(config)
    params = jax.tree.map(jnp.zeros_like, noisy_params(config))
    texts = ["naïve café au lait", "ab"]  # 4 words in 20 UTF-8 bytes (ï, é: 2 bytes each); 1 word in 2 bytes
    result = evaluate(model, params, texts, tokenizer=WordTokenizer())
    m = result.metrics()
    assert (result.num_tokens, result.num_bytes) == (5, 22)
    assert m["loss"] == pytest.approx(math.log(61), rel=1e-6)
    assert m["perplexity"] == pytest.approx(61, rel=1e-5)
    assert m["bits_per_token"] == pytest.approx(math.log2(61), rel=1e-6)
    assert m["bits_per_byte"] == pytest.approx(5 * math.log2(61) / 22, rel=1e-6)  # = 1.3478...
    assert [d.num_bytes for d in result.documents] == [20, 2]
    assert result.documents[0].loss_sum == pytest.approx(4 * math.log(61), rel=1e-6)


def test_bad_documents_are_refused_with_the_value():
    model, params = small_model(abs_pos_emb=False)
    with pytest.raises(ValueError, match=r"document 1: token id 61 is out of range: must be in \[0, 61\)"):
        evaluate(model, params, [[3, 4], [5, 61]], bos_id=BOS)
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate(model, params, [[]], bos_id=BOS)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        evaluate(model, params, [[3, 4]])
    with pytest.raises(ValueError, match=r"batch_size=0 is out of range"):
        evaluate(model, params, [[3, 4]], bos_id=BOS, batch_size=0)


def test_streamed_documents_give_the_same_result_and_report_progress():
    model, params = small_model(abs_pos_emb=False)
    docs = documents([30, 2, 17])
    seen = []
    streamed = evaluate(model, params, iter(docs), bos_id=BOS, batch_size=2, num_documents=3, progress=seen.append)
    listed = evaluate(model, params, docs, bos_id=BOS, batch_size=2)
    assert streamed.loss_sum == pytest.approx(listed.loss_sum, rel=1e-6)
    assert seen[-1].tokens == 49 and seen[-1].documents == 3 and seen[-1].total_documents == 3
    assert [p.tokens for p in seen] == sorted(p.tokens for p in seen)


def test_progress_line_goes_by_tokens_when_their_total_is_known():
    from perceiver_ar_jax.evaluation import Progress
    from perceiver_ar_jax.evaluation.report import progress_line

    line = progress_line(Progress(tokens=2500, total_tokens=10000, documents=1, total_documents=4, seconds=5.0),
                         width=8)
    assert line == "[##......]  25% | 2,500/10,000 tokens | 1 of 4 documents | 500 tok/s | ETA 0:15"
    line = progress_line(Progress(tokens=2500, total_tokens=None, documents=1, total_documents=4, seconds=5.0),
                         width=8)
    assert line.startswith("[##......]  25% | 2,500 tokens | 1 of 4 documents") and line.endswith("ETA 0:15")
