"""The evaluation stage: the loss of long documents, every token scored once with as much context as the model
allows, and how the loss falls with context.

    from perceiver_ar_jax.evaluation import evaluate
    result = evaluate(model, params, texts, tokenizer=tokenizer, stride=...)
    python evaluate.py --checkpoint DIR --text_file F        # the command line

`windows.py` (which window scores which token: the one definition), `batches.py` (windows of many documents
packed into fixed-size batches), `step.py` (the compiled, sharded scoring step), `results.py` (per-document losses,
totals, context buckets), `scoring.py` (`evaluate`), `sources.py` (the command line's documents: text files or a
TFDS split), `report.py` (table, progress line, JSON and plot).
"""

from perceiver_ar_jax.evaluation.results import DocumentScore, EvaluationResult
from perceiver_ar_jax.evaluation.scoring import Progress, evaluate
from perceiver_ar_jax.evaluation.windows import WindowSpec

__all__ = ["DocumentScore", "EvaluationResult", "Progress", "WindowSpec", "evaluate"]
