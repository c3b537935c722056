"""Fault injection: train.py and sweep.py SIGKILLed at random moments (seeded), one kill inside a checkpoint write,
then started again until they finish, end exactly where uninterrupted runs end. CPU, vit_nano_patch8 at 16 px on
digits; every process is real, so most of the time is Python and torch starting up.

Run: python -m pytest -q test_faults.py     (2 tests, about a minute on a shared 2-core CPU)
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from test_sweep import FIXED, TINY as SWEEP, processes_with
from test_sweep import finish as finish_sweep
from test_sweep import start as start_sweep
from test_train import TINY, assert_same_run
from train import RunError

HERE = Path(__file__).resolve().parent

# Test-side only: a torch.save that writes a '*.tmp' file (runs.atomic_save's) in two halves with a pause between,
# so that a kill can land inside a checkpoint write and leave a torn file behind, as a power cut would.
SLOW_SAVE = """import io, time, torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if not str(f).endswith('.tmp'):
        return _save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    with open(f, 'wb') as out:
        out.write(data[:len(data) // 2])
        out.flush()
        time.sleep(0.5)
        out.write(data[len(data) // 2:])
torch.save = save
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='SIGKILL, prctl and /proc: Linux')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the killed processes: the same arithmetic
    yield
    torch.set_num_threads(n)


def test_train_killed_at_random_moments_resumes_bit_identically(tmp_path):
    """VPT with prompt dropout at --workers 2 (the RNG streams matter): killed inside the epoch-2 checkpoint write
    (a torn last.pt.tmp beside the epoch-1 last.pt), then 3 times at random moments, each time started again (with
    --resume once last.pt exists) until it finishes: the tuned tensors, optimizer state and metrics equal an
    uninterrupted run's. While one runs, a second process on its directory is refused, naming its pid; a SIGKILLed
    holder never blocks the next start."""
    args = TINY[:-4] + ['--workers', '2', '--method', 'vpt', '--prompts', '4', '--epochs', '5',
                        '--max-steps-per-epoch', '2', '--batch-size', '16', '--warmup-epochs', '1']
    train.main(args + ['--log-interval', '0', '--out', str(tmp_path / 'ref')])  # uninterrupted
    site = tmp_path / 'site'
    site.mkdir()
    (site / ('sitecustomize' + '.py')).write_text(SLOW_SAVE)
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS='1')
    out, rng = tmp_path / 'run', random.Random(0)
    ckpt, tmp = out / 'last.pt', out / ('last.pt' + '.tmp')
    for attempt in range(20):
        resume = ['--resume'] if ckpt.exists() else []
        proc = subprocess.Popen([sys.executable, 'train.py', *args, '--log-interval', '1', '--out', str(out), *resume],
                                cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            if attempt == 0:  # inside the second checkpoint write
                while not (ckpt.exists() and tmp.exists()):
                    assert proc.poll() is None
                    time.sleep(0.005)
            elif attempt <= 3:  # at a random moment once it trains
                for line in proc.stdout:
                    if line.startswith('epoch ') and ' step ' in line:
                        break
                if attempt == 1:
                    with pytest.raises(RunError, match=f"{out} is in use by process {proc.pid}"):
                        train.main(['--resume', '--out', str(out)])
                time.sleep(rng.uniform(0, 1.5))
            else:
                stdout, _ = proc.communicate(timeout=300)
                assert proc.returncode == 0, stdout[-3000:]
                break
            os.killpg(proc.pid, signal.SIGKILL)  # train.py and its loader workers
            proc.communicate()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if attempt == 0:  # torn: half a zip archive, which torch cannot read; last.pt holds epoch 1
            with pytest.raises(Exception):
                torch.load(tmp, weights_only=True)
            assert torch.load(ckpt, weights_only=True)['epoch'] == 1
    assert attempt == 4
    assert_same_run(tmp_path / 'ref', out)


def test_sweep_killed_at_random_moments_writes_the_same_table(tmp_path):
    """A 2-cell grid and one seed, SIGKILLed at 3 random moments (startup, a cell's import, its training, the
    report) and rerun until it finishes: the same results.json as an uninterrupted sweep's, and no process left."""
    args = SWEEP + ['--data', 'digits', '--lr', '0.5,0.1', '--wd', '0', '--seeds', '0', '--jobs', '1']
    reference = start_sweep(args + ['--out', str(tmp_path / 'ref')] + FIXED)
    rng, out = random.Random(1), tmp_path / 'killed'
    for attempt in range(10):
        proc = start_sweep(args + ['--out', str(out)] + FIXED)
        if attempt < 3:
            try:
                proc.wait(timeout=rng.uniform(1, 8))
            except subprocess.TimeoutExpired:
                proc.kill()  # the sweep alone: its cell gets SIGTERM from the kernel (prctl), and ends
            proc.communicate()
        else:
            rc, stdout, stderr = finish_sweep(proc)
            assert rc == 0, stderr
            break
    rc, _, stderr = finish_sweep(reference)
    assert rc == 0, stderr
    table = json.loads((out / 'results.json').read_text())
    assert table == json.loads((tmp_path / 'ref' / 'results.json').read_text()) and table['rows'][0]['n'] == 1
    deadline = time.time() + 30
    while processes_with(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_with(str(out)) == []
