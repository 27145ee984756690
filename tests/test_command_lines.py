"""What train.py and sample.py show and exit with: progress and our own lines on the console (the libraries' INFO
chatter in the workdir's train.log), one `error:` line and the documented status per failure, nothing written by a
run that never started, a save before stopping on Ctrl-C or SIGTERM. (convert: tests/test_convert.py; the status
table: tests/test_restore_errors.py.)"""

import glob
import os
import shutil
import signal
import subprocess
import sys

import pytest

from perceiver_ar_jax import checkpoints
from perceiver_ar_jax.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PREEMPTED
from tests.conftest import REPO, tiny_train_py_flags

ORBAX_INFO = "checkpoint_manager.py"  # in the file name of orbax's INFO records


def run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, **kwargs)


def assert_one_error_line(proc, status, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_text):
    """train.py, 4 steps of a tiny model on local text: (its flags without the workdir, workdir, the process)."""
    corpus, tokenizer = local_text
    workdir = tmp_path_factory.mktemp("train_py") / "run"
    cmd = tiny_train_py_flags(workdir, corpus, tokenizer, eval_every_steps=4, checkpoint_every_steps=2)
    return cmd, workdir, run(cmd)


def with_ctrl_c(cmd):
    """`python script args` with SIGINT handled as in a terminal: a background job (pytest started with &) hands
    "ignore SIGINT" on to its children, and train.py leaves an ignored SIGINT ignored."""
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [cmd[0], "-c", launcher, *cmd[1:]]


def with_workdir(cmd, workdir, *extra):
    return [a if not a.startswith("--workdir=") else f"--workdir={workdir}" for a in cmd] + list(extra)


def test_train_py_console_shows_progress_and_the_log_file_keeps_the_rest(trained):
    cmd, workdir, proc = trained
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 4/4 | loss" in proc.stdout and "eval at step 4" in proc.stdout
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= 6, console  # steps 2 and 4, the eval, "training in ...": no library chatter
    assert ORBAX_INFO not in proc.stderr and "Traceback" not in proc.stderr
    log = (workdir / "train.log").read_text()
    assert ORBAX_INFO in log and "training in " in log
    config, _ = checkpoints.load_model(workdir)
    assert (config.num_channels, config.max_seq_len, config.vocab_size) == (32, 64, 300)  # the overrides
    assert (workdir / "spiece.model").is_file() and (workdir / "train_config.json").is_file()


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_PREEMPTED)],
                         ids=["Ctrl-C", "SIGTERM"])
def test_a_stopped_run_resumes_saves_and_exits_with_the_signal_status(trained, tmp_path, signum, status):
    cmd, workdir, proc = trained
    assert proc.returncode == 0
    shutil.copytree(workdir, tmp_path / "run")
    more = with_workdir(cmd, tmp_path / "run", "--config.num_train_steps=500", "--config.log_every_steps=1",
                        "--verbosity=0")  # --verbosity=0: every library's INFO records on the console too
    child = subprocess.Popen(with_ctrl_c(more), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in child.stdout:
        if line.startswith("step 6/"):
            child.send_signal(signum)
            break
    out, err = child.communicate(timeout=300)
    assert child.returncode == status, err[-3000:]
    assert "resumed from the checkpoint at step 4" in err and ORBAX_INFO in err
    assert f"received {signal.Signals(signum).name}: saving a checkpoint" in err and "Traceback" not in err
    saved = checkpoints.saved_steps(tmp_path / "run")
    assert 6 <= max(saved) < 500


def test_a_misspelled_field_is_one_line_naming_the_closest_one(trained, tmp_path):
    cmd, _, _ = trained
    proc = run(with_workdir(cmd, tmp_path / "run", "--config.model.num_head=4"))
    assert_one_error_line(proc, EXIT_BAD_INPUT, "config.model.num_head=4 is not a config field: did you mean "
                                                "model.num_heads?")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_at_once_is_one_line_and_leaves_no_files(trained, tmp_path):
    cmd, _, _ = trained
    proc = run(with_workdir(cmd, tmp_path / "run", f"--config.data.text_paths=('{tmp_path / 'missing'}',)"))
    assert_one_error_line(proc, EXIT_BAD_INPUT, str(tmp_path / "missing"))
    assert not (tmp_path / "run").exists()


def truncate(pattern):
    for f in glob.glob(pattern, recursive=True):
        if os.path.isfile(f):
            os.truncate(f, 3)


def test_every_checkpoint_damaged_is_one_line_for_train_py_and_sample_py(trained, tmp_path):
    cmd, workdir, proc = trained
    assert proc.returncode == 0
    shutil.copytree(workdir, tmp_path / "run")
    truncate(str(tmp_path / "run" / "checkpoints" / "*" / "params" / "**" / "*"))
    proc = run(with_workdir(cmd, tmp_path / "run", "--config.num_train_steps=6"))
    assert_one_error_line(proc, EXIT_BAD_INPUT, f"every checkpoint in {tmp_path / 'run' / 'checkpoints'} is "
                                                "damaged (4: ", "; 2: ")
    sample = run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(tmp_path / "run"), "--prompt", "The"])
    assert_one_error_line(sample, EXIT_BAD_INPUT, "is damaged")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]  # nothing renamed


def test_console_keeps_library_records_off_even_from_a_venv_inside_the_repository():
    """Our INFO records reach the console; a library's do not, also when its virtual environment sits in the
    repository (.ci/run makes .venv there), whose root holds our scripts."""
    import logging

    from perceiver_ar_jax.errors.console import ConsoleFilter

    def record(path, level=logging.INFO):
        return logging.LogRecord("x", level, str(path), 1, "message", None, None)

    console = ConsoleFilter(verbosity=None)
    assert console.filter(record(REPO / "perceiver_ar_jax" / "training" / "loop.py"))
    assert console.filter(record(REPO / "train.py"))
    assert not console.filter(record(REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "orbax" / "x.py"))
    assert console.filter(record(REPO / ".venv" / "lib" / "orbax.py", logging.WARNING))  # warnings always


def test_log_file_starts_before_its_directory_exists(tmp_path):
    """In a multi-process run only process 0 writes the workdir's files; process 1 may start its log first (it
    failed with FileNotFoundError and left process 0 waiting in a collective until the test's timeout)."""
    import logging

    from perceiver_ar_jax.errors.console import LogFile

    log_file = LogFile()
    try:
        logging.getLogger("perceiver_ar_jax").warning("before the start")
        path = tmp_path / "not_yet" / "train.process_1.log"
        log_file.start(path)
        logging.getLogger("perceiver_ar_jax").warning("after the start")
    finally:
        log_file.close()
    assert "before the start" in path.read_text() and "after the start" in path.read_text()
