"""Two CPU processes train together, are stopped, resume, and match one process.

Each process of tests/train/multihost_worker.py has 2 CPU devices; together they
form a 4-device mesh, and each feeds its own half of every global batch. The
reference is one process with 4 devices and the same global batch, trained
without interruption.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "train", "multihost_worker.py")
STEPS, STOP_AFTER = 4, 2  # the worker checkpoints every 2 steps
STOPPED = 3  # the worker's exit code after --stop_after
TIMEOUT_S = 300  # per run


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(devices_per_process: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")


def run_processes(num_processes: int, workdir, out, log_dir, env, *extra) -> list[int]:
  """Runs the worker in `num_processes` processes at once; their exit codes.

  Once one fails the others are killed: they would wait for it until JAX's
  heartbeat timeout.
  """
  port = free_port()
  processes = []
  try:
    for i in range(num_processes):
      distributed = [f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}",
                     f"--process_id={i}"] if num_processes > 1 else []
      with open(os.path.join(log_dir, f"process_{i}.log"), "a") as log:
        processes.append(subprocess.Popen(
            [sys.executable, WORKER, f"--workdir={workdir}", f"--out={out}",
             f"--steps={STEPS}", *distributed, *extra],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in processes):
      if any(p.poll() not in (None, 0, STOPPED) for p in processes):
        break
      assert time.monotonic() < deadline, f"workers still running after {TIMEOUT_S} s"
      time.sleep(0.5)
    return [p.poll() for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def logged_steps(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def logs(log_dir, num_processes: int) -> str:
  return "\n".join(open(os.path.join(log_dir, f"process_{i}.log")).read()
                   for i in range(num_processes))


def load_worker():
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def assert_same_params(params, reference) -> None:
  assert sorted(params) == sorted(reference)
  for k in reference:
    np.testing.assert_allclose(params[k], reference[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_processes_stopped_and_resumed_equal_one_process(tmp_path):
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  for d in (one, two):
    d.mkdir()

  codes = run_processes(1, one / "work", one / "out", one, worker_env(4))
  assert codes == [0], logs(one, 1)[-3000:]

  env = worker_env(2)
  codes = run_processes(2, two / "work", two / "out", two, env, f"--stop_after={STOP_AFTER}")
  assert codes == [STOPPED, STOPPED], logs(two, 2)[-3000:]
  assert os.listdir(two / "work" / "checkpoints" / "masks").count(str(STOP_AFTER)) == 1
  assert not (two / "work" / "networks" / "masks" / "DONE").exists()
  codes = run_processes(2, two / "work", two / "out", two, env)
  assert codes == [0, 0], logs(two, 2)[-3000:]
  assert logs(two, 2).count("[masks] resuming from step 2 of 4") == 2

  # Process 0 alone logs: each step once, and the same losses as one process.
  single, multi = logged_steps(one / "work"), logged_steps(two / "work")
  assert [row["step"] for row in multi] == list(range(1, STEPS + 1))
  assert multi[-1]["critic_loss"] != multi[0]["critic_loss"], "nothing was trained"
  for a, b in zip(single, multi):
    for k in a:
      if k not in ("stage", "step", "steps_per_s"):
        # Gradient norms sum squares across devices in another order: float noise of
        # a few 1e-4 relative (seen once at 1.8e-4); the parameters below must agree to 1e-4.
        np.testing.assert_allclose(b[k], a[k], rtol=1e-3 if k.endswith("grad_norm") else 1e-4,
                                   atol=1e-6, err_msg=k)

  # Every process reads back the same exported networks, equal to one process's,
  # and so does this process, on 8 devices of its own.
  reference = dict(np.load(one / "out" / "params_0.npz"))
  for i in range(2):
    assert_same_params(dict(np.load(two / "out" / f"params_{i}.npz")), reference)
  worker = load_worker()
  assert_same_params(worker.exported_networks(str(two / "work"), worker.run_config(STEPS)),
                     reference)
