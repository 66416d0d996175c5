"""One training per run folder: `rlr-fast train` (and `demo`) hold the folder with an OS lock from
before they check it to their end; a second training of it is refused with the holder named and
nothing of the first touched, and a holder killed outright leaves no lock behind."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rlr_fast.cli import main
from rlr_fast.errors import RunBusyError
from rlr_fast.runs import Run

# A second process that holds a run folder's training lock until it is killed (as a training would).
HOLDER = textwrap.dedent("""
    import sys, time
    from rlr_fast.runs import Run
    with Run(sys.argv[1]).training_lock("holder for the test"):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def held(tmp_path):
    """(run folder, holder process) with the folder's lock held by another process."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_holder_is_refused_with_the_first_named(held):
    run, proc = held
    with pytest.raises(RunBusyError) as e:
        with Run(run).training_lock():
            pytest.fail("the lock was taken twice")
    message = str(e.value)
    assert f"process {proc.pid}" in message and "holder for the test" in message and str(run) in message


def test_a_killed_holder_leaves_no_lock(held):
    run, proc = held
    proc.send_signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
    proc.wait()
    assert (run / Run.LOCK).is_file()  # the killed holder could not remove its file
    with Run(run).training_lock():  # taken at once: the OS released the dead holder's lock
        record = json.loads((run / Run.LOCK).read_text())
    assert record["pid"] == os.getpid()
    assert not (run / Run.LOCK).exists()  # removed on release
    with Run(run).training_lock():  # and taken again within this process
        pass


def test_train_into_a_folder_being_trained_changes_nothing_there(data, held, capsys):
    run, proc = held
    (run / Run.CHECKPOINT).write_bytes(b"the first training's checkpoint")
    (run / Run.LOG).write_text('{"epoch": 1}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != Run.LOCK}
    common = ["--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
              "--epochs", "1", "--no-progress"]
    for extra in (["--force"], ["--resume"], []):
        assert main(["train", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert f"is being trained by process {proc.pid}" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != Run.LOCK} == before


def test_the_lock_file_is_not_part_of_the_run(data, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
              "--epochs", "1", "--no-progress"]
    assert main(["train", *common]) == 0
    assert not (run / Run.LOCK).exists()  # removed when the training ended
    (run / Run.LOCK).write_text("{}")  # as a killed training leaves it: not a lock, not a run file
    assert Run.LOCK not in Run(run).entries()
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0  # the lock of the first run is free
    assert main(["train", *common, "--force"]) == 0
    log = [json.loads(line) for line in (run / Run.LOG).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]


def test_a_real_training_holds_its_folder_until_it_ends(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlr_fast", "train", "--data", str(data), "--out", str(run), "--image-size", "64",
           "--backbone-weights", "random", "--epochs", "400", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / Run.LOG).is_file():  # training has started (its first epoch is logged)
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        with pytest.raises(RunBusyError, match=f"process {proc.pid}"):
            with Run(run).training_lock():
                pass
    finally:
        proc.kill()
        proc.wait(timeout=60)
    with Run(run).training_lock():  # free again once the training is gone
        pass


# Takes and releases the lock many times; inside, creates a marker file exclusively: if two
# processes ever held the lock at once (e.g. one locked a file the other had just removed on
# release), the second creation fails.
CONTENDER = textwrap.dedent("""
    import os, sys
    from rlr_fast.io import exclusive_lock
    lock, marker, taken = sys.argv[1], sys.argv[2], 0
    while taken < 150:
        try:
            with exclusive_lock(lock, {"pid": os.getpid()}):
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # FileExistsError: held twice
                os.unlink(marker)
                taken += 1
        except BlockingIOError:
            pass
""")


def test_two_processes_never_hold_the_lock_at_once(tmp_path):
    args = [sys.executable, "-c", CONTENDER, str(tmp_path / "x.lock"), str(tmp_path / "marker")]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert not (tmp_path / "x.lock").exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX flock")
def test_a_file_system_without_locks_trains_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="without file locks"):
        with Run(run).training_lock():
            (run / "checkpoint.pt").write_bytes(b"x")  # the training runs
    assert (run / "checkpoint.pt").is_file() and not (run / Run.LOCK).exists()
