"""The offline demo (the README's main command), shortened to a few steps."""

import subprocess
import sys

from perceiver_ar_jax.checkpoints import TrainingCheckpoints


def test_demo_trains_a_tokenizer_and_model_offline_then_samples_from_its_checkpoint(tmp_path):
    workdir = tmp_path / "demo"
    command = [sys.executable, "-m", "perceiver_ar_jax.demo", "--workdir", str(workdir), "--steps", "4",
               "--max-new-tokens", "8"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "training a 1024-piece SentencePiece vocabulary on 79 help topics" in out
    assert "step 4/4 | loss" in out and "training loss fell from" in out
    assert out.count("\n>>> ") == 3  # one continuation per prompt
    assert "checkpoint_manager" not in proc.stderr and "Traceback" not in proc.stderr  # no library chatter
    assert len(list((workdir / "corpus").glob("*.txt"))) == 79
    # the tokenizer files once, in the workdir (where training keeps them), and nothing else besides the run's
    assert {p.name for p in workdir.iterdir()} == {"corpus", "checkpoints", "config.json", "train_config.json",
                                                   "train.log", "spiece.model", "tokenizer_config.json",
                                                   "special_tokens_map.json"} | {p.name for p in
                                                                                 workdir.glob("events.out.*")}
    assert TrainingCheckpoints(str(workdir), read_only=True).steps() == [4]

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.startswith(f"training finished earlier (4 steps in {workdir}): sampling only")
    assert "training a " not in again.stdout and "training configs/tiny.py" not in again.stdout
    assert again.stdout.count("\n>>> ") == 3
