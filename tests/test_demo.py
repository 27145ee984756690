"""The offline demo (the README's main command), shortened to a few steps."""

import subprocess
import sys

from perceiver_ar_jax.checkpoints import TrainingCheckpoints


def test_demo_trains_a_tokenizer_and_model_offline_then_samples_from_its_checkpoint(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "perceiver_ar_jax.demo", "--workdir", str(workdir), "--steps", "4",
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "training a 1024-piece SentencePiece vocabulary on 79 help topics" in out
    assert "step 4/4 | loss" in out and "training loss fell from" in out
    assert out.count("\n>>> ") == 3  # one continuation per prompt
    assert (workdir / "tokenizer" / "spiece.model").is_file() and len(list((workdir / "corpus").glob("*.txt"))) == 79
    assert TrainingCheckpoints(str(workdir), read_only=True).steps() == [4]
