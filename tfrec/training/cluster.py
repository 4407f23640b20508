"""Local tf.distribute clusters: the processes a scheduler would start, on 127.0.0.1.

`local:N` starts N MultiWorkerMirrored workers (task 0 is the chief); `local:ps=M,workers=N`
starts N workers and M parameter servers, this process being the coordinator. Every
process gets its own TF_CONFIG, so the training code is the one a multi-host cluster runs.

On a real cluster the scheduler sets TF_CONFIG and every host runs the same command:
`tfrec train --strategy multi_worker`, or `tfrec train --strategy parameter_server`
(the "chief" task trains, "worker" and "ps" tasks serve until killed, see `run_server`).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, TextIO

import tfrec  # noqa: F401

from tfrec.config import Config

SPEC_HELP = ("local:N for N MultiWorkerMirrored worker processes, or local:ps=M,workers=N "
             "for a parameter-server cluster (M PS + N worker processes, this process "
             "coordinating)")
HOST = "127.0.0.1"
STOP_GRACE_SECONDS = 10.0


class ClusterError(RuntimeError):
    """A process of a local cluster failed; the message names it."""


@dataclass(frozen=True)
class LocalCluster:
    """Shape of a local cluster.

    Args:
      strategy: "multi_worker" or "parameter_server".
      workers: worker processes.
      ps: parameter-server processes (parameter_server only).
    """

    strategy: str
    workers: int
    ps: int = 0

    def addresses(self, ports: Sequence[int]) -> Dict[str, List[str]]:
        """TF_CONFIG "cluster" mapping on 127.0.0.1 (needs `len(self.jobs())` ports)."""
        ports = list(ports)
        if len(ports) != len(self.jobs()):
            raise ValueError(f"expected {len(self.jobs())} ports, got {len(ports)}")
        cluster: Dict[str, List[str]] = {}
        for (job, _), port in zip(self.jobs(), ports):
            cluster.setdefault(job, []).append(f"{HOST}:{port}")
        return cluster

    def jobs(self) -> List["tuple[str, int]"]:
        """(job, index) of every task; the PS coordinator is task ("chief", 0)."""
        tasks = [("chief", 0)] if self.strategy == "parameter_server" else []
        tasks += [("worker", i) for i in range(self.workers)]
        tasks += [("ps", i) for i in range(self.ps)]
        return tasks


def parse_cluster(spec: str) -> LocalCluster:
    """Parses `local:N` or `local:ps=M,workers=N` (keys in any order).

    Args:
      spec: the --cluster value.
    """
    text = (spec or "").strip().lower()
    if not text.startswith("local:"):
        raise ValueError(f"unknown cluster {spec!r}: expected {SPEC_HELP}; on a real "
                         "cluster set TF_CONFIG and use --strategy multi_worker or "
                         "parameter_server instead")
    body = text[len("local:"):]
    if re.fullmatch(r"\d+", body):
        workers = int(body)
        if workers < 1:
            raise ValueError(f"cluster {spec!r} needs at least 1 worker")
        return LocalCluster("multi_worker", workers=workers)
    counts = {}
    for part in body.split(","):
        match = re.fullmatch(r"(ps|workers)=(\d+)", part.strip())
        if not match or match.group(1) in counts:
            raise ValueError(f"cannot parse cluster {spec!r}: expected {SPEC_HELP}, "
                             "e.g. local:2 or local:ps=1,workers=2")
        counts[match.group(1)] = int(match.group(2))
    if counts.get("ps", 0) < 1 or counts.get("workers", 0) < 1:
        raise ValueError(f"cluster {spec!r} needs ps >= 1 and workers >= 1, e.g. "
                         "local:ps=1,workers=2")
    return LocalCluster("parameter_server", workers=counts["workers"], ps=counts["ps"])


def free_ports(n: int) -> List[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all sockets held open until chosen)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(cluster: Dict[str, List[str]], task_type: str, index: int) -> str:
    """TF_CONFIG of one task of `cluster`."""
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


_DIE_WITH_PARENT = sys.platform.startswith("linux")


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the launcher dies, so no worker outlives it.

    (The signal follows the thread that started the child: always the main thread here.)
    """
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Task:
    """One cluster process whose output is copied to `out` line by line with a prefix.

    A waiter thread stamps the exit time, so when one worker's death makes its peers
    fail too, the launcher still names the one that died first.
    """

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], out: TextIO,
                 lock: threading.Lock):
        self.name = name
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
            preexec_fn=_die_with_parent if _DIE_WITH_PARENT else None)
        self.exit_time: Optional[float] = None
        self._thread = threading.Thread(target=self._pump, args=(out, lock), daemon=True,
                                        name=f"log-{name}")
        self._thread.start()
        threading.Thread(target=self._wait, daemon=True, name=f"wait-{name}").start()

    def _wait(self) -> None:
        self.proc.wait()
        self.exit_time = time.monotonic()

    def _pump(self, out: TextIO, lock: threading.Lock) -> None:
        for line in self.proc.stdout:
            with lock:
                out.write(f"[{self.name}] {line}" if line.endswith("\n")
                          else f"[{self.name}] {line}\n")
                out.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; waits for the log pump."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Launcher:
    """Starts, watches and stops the processes of one local cluster."""

    def __init__(self, out: Optional[TextIO] = None):
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.tasks: List[_Task] = []
        self.stopping = False

    def start(self, name: str, argv: List[str], env: Dict[str, str], address: str) -> _Task:
        task = _Task(name, argv, env, self.out, self.lock)
        self.tasks.append(task)
        self.say(f"started {name} (pid {task.pid}, {address})")
        return task

    def say(self, message: str) -> None:
        with self.lock:
            self.out.write(f"[cluster] {message}\n")
            self.out.flush()

    def failed(self) -> Optional[_Task]:
        """The task that exited with an error first, if any."""
        dead = [t for t in self.tasks if t.exit_time is not None and t.poll() != 0]
        return min(dead, key=lambda t: t.exit_time) if dead else None

    def stop_all(self) -> None:
        self.stopping = True
        for task in self.tasks:
            if task.poll() is None:
                task.proc.terminate()
        for task in self.tasks:
            task.stop()

    def failure(self, task: _Task, what: str) -> ClusterError:
        """The error naming `task`, and the peers that failed after it (e.g. in collectives)."""
        after = [f"{t.name}: {_describe_exit(t.poll())}" for t in self.tasks
                 if t is not task and t.exit_time is not None and t.poll() != 0]
        then = f" (then {', '.join(after)})" if after else ""
        return ClusterError(
            f"{task.name} (pid {task.pid}) {_describe_exit(task.poll())} during {what}{then}; "
            "the other processes were stopped. Re-run the same command with the same "
            "--run-name to resume from the last epoch backed up")


def _child_env(config: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["TF_CONFIG"] = config
    env["PYTHONUNBUFFERED"] = "1"  # logs stream as they are written
    return env


def _train_argv(config_path: str, strategy: str, verbose: bool) -> List[str]:
    return ([sys.executable, "-m", "tfrec.cli", "train", "--config", config_path,
             "--strategy", strategy] + (["--verbose"] if verbose else []))


def _wait_for_ports(launcher: _Launcher, addresses: Dict[str, str], timeout: float) -> None:
    """Blocks until every server accepts connections (a dead one raises ClusterError)."""
    deadline = time.monotonic() + timeout
    pending = dict(addresses)
    while pending:
        dead = launcher.failed()
        if dead is not None:
            raise launcher.failure(dead, "start-up")
        for name, address in list(pending.items()):
            host, port = address.rsplit(":", 1)
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    del pending[name]
            except OSError:
                pass
        if pending and time.monotonic() > deadline:
            raise ClusterError(f"{', '.join(pending)} did not start serving within "
                               f"{timeout:.0f}s")
        if pending:
            time.sleep(0.2)


def run_multi_worker(cluster: LocalCluster, cfg: Config, verbose: bool = False,
                     out: Optional[TextIO] = None) -> str:
    """Runs `cfg`'s training on `cluster.workers` local MultiWorkerMirrored processes.

    TFRecords are prepared here once so workers never race to write them; every worker
    then runs `tfrec train --strategy multi_worker` with its TF_CONFIG.

    Args:
      cluster: a "multi_worker" LocalCluster.
      cfg: the run's config (the run name is fixed here so all workers share it).
      verbose: debug logging in the workers.
      out: where worker logs go (default stdout), each line prefixed "[worker i]".

    Returns:
      The run directory. Raises ClusterError naming the worker when one fails.
    """
    from tfrec.training.trainer import default_run_name, ensure_prepared

    cfg.train.run_name = cfg.train.run_name or default_run_name()
    cfg.train.strategy = "multi_worker"
    ensure_prepared(cfg)
    launcher = _Launcher(out)
    tmp = tempfile.mkdtemp(prefix="tfrec-cluster-")
    previous = _on_sigterm(_raise_exit)
    try:
        config_path = os.path.join(tmp, "config.yaml")
        cfg.to_yaml(config_path)
        addresses = cluster.addresses(free_ports(len(cluster.jobs())))
        for job, index in cluster.jobs():
            launcher.start(f"{job} {index}", _train_argv(config_path, "multi_worker", verbose),
                           _child_env(tf_config(addresses, job, index)), addresses[job][index])
        while True:
            dead = launcher.failed()
            if dead is not None:
                raise launcher.failure(dead, "training")
            if all(task.exit_time is not None and task.poll() == 0
                   for task in launcher.tasks):
                break
            time.sleep(0.2)
        launcher.say(f"all {cluster.workers} workers finished run {cfg.train.run_name}")
        return os.path.join(cfg.train.checkpoint_dir, cfg.train.run_name)
    finally:
        launcher.stop_all()
        _on_sigterm(previous)
        shutil.rmtree(tmp, ignore_errors=True)


def run_parameter_server(cluster: LocalCluster, cfg: Config, verbose: bool = False,
                         out: Optional[TextIO] = None):
    """Trains with ParameterServerStrategy: local worker/PS servers, this process coordinating.

    Args:
      cluster: a "parameter_server" LocalCluster.
      cfg: the run's config.
      verbose: debug logging in the servers.
      out: where server logs go (default stdout), prefixed "[worker i]" / "[ps i]".

    Returns:
      The coordinator's TrainResult. A server that dies ends this process with exit
      code 1 and a message naming it (the coordinator would otherwise wait for it).
    """
    from tfrec.training.trainer import default_run_name, train_retrieval

    cfg.train.run_name = cfg.train.run_name or default_run_name()
    cfg.train.strategy = "parameter_server"
    launcher = _Launcher(out)
    tmp = tempfile.mkdtemp(prefix="tfrec-cluster-")
    previous_env = os.environ.get("TF_CONFIG")
    previous = _on_sigterm(_raise_exit)
    try:
        config_path = os.path.join(tmp, "config.yaml")
        cfg.to_yaml(config_path)
        addresses = cluster.addresses(free_ports(len(cluster.jobs())))
        servers = {}
        for job, index in cluster.jobs():
            if job == "chief":
                continue
            name = f"{job} {index}"
            launcher.start(name, _train_argv(config_path, "parameter_server", verbose),
                           _child_env(tf_config(addresses, job, index)), addresses[job][index])
            servers[name] = addresses[job][index]
        _wait_for_ports(launcher, servers, timeout=180)
        launcher.say(f"{cluster.workers} workers and {cluster.ps} ps serving; "
                     f"coordinating from this process ({addresses['chief'][0]})")
        threading.Thread(target=_watch_servers, args=(launcher,), daemon=True,
                         name="watch-servers").start()
        os.environ["TF_CONFIG"] = tf_config(addresses, "chief", 0)
        try:
            result = train_retrieval(cfg)  # its model is a local copy, off the cluster
        except Exception as e:
            dead = _first_failure(launcher, grace=2.0)
            if dead is not None:  # TF's UnavailableError does not say which task died
                raise launcher.failure(dead, "training") from e
            raise
        if _DIE_WITH_PARENT:
            # Every tf.function is registered on the servers and unregistered when it is
            # freed, up to interpreter exit; stopping them now would log one gRPC error
            # per function. They get SIGKILL when this process ends instead.
            launcher.stopping = True
            launcher.say("training done; the servers stop when this process exits")
            launcher.tasks = []
        return result
    finally:
        launcher.stop_all()
        _on_sigterm(previous)
        if previous_env is None:
            os.environ.pop("TF_CONFIG", None)
        else:
            os.environ["TF_CONFIG"] = previous_env
        shutil.rmtree(tmp, ignore_errors=True)


def _first_failure(launcher: _Launcher, grace: float) -> Optional[_Task]:
    """The first failed task, waiting up to `grace` seconds for exits to be recorded."""
    deadline = time.monotonic() + grace
    while True:
        dead = launcher.failed()
        if dead is not None or time.monotonic() > deadline:
            return dead
        time.sleep(0.1)


def _watch_servers(launcher: _Launcher) -> None:
    """Ends the coordinator when a server dies: TF would wait for it to come back."""
    while not launcher.stopping:
        dead = launcher.failed()
        if dead is not None and not launcher.stopping:
            error = launcher.failure(dead, "training")
            launcher.stopping = True
            for task in launcher.tasks:
                if task.poll() is None:
                    task.proc.kill()
            sys.stderr.write(f"tfrec: error: {error}\n")
            sys.stderr.flush()
            os._exit(1)  # the main thread is blocked inside TensorFlow's coordinator
        time.sleep(0.5)


def _on_sigterm(handler):
    """Installs a SIGTERM handler (main thread only); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)  # runs the launcher's `finally`: workers are stopped


def launch(spec: str, cfg: Config, verbose: bool = False, out: Optional[TextIO] = None):
    """Runs training on the local cluster described by `spec` (see `parse_cluster`).

    Returns:
      The TrainResult for a parameter-server cluster (trained in this process), the run
      directory for a multi-worker one.
    """
    cluster = parse_cluster(spec)
    if cfg.train.strategy not in ("default", cluster.strategy):
        raise ValueError(f"--cluster {spec} trains with strategy {cluster.strategy!r}, not "
                         f"{cfg.train.strategy!r}: drop --strategy (or train.strategy)")
    if cluster.strategy == "multi_worker":
        return run_multi_worker(cluster, cfg, verbose=verbose, out=out)
    return run_parameter_server(cluster, cfg, verbose=verbose, out=out)


def is_server_task(cfg: Config) -> bool:
    """True for the worker and PS tasks of a parameter-server cluster (they only serve)."""
    if cfg.train.strategy != "parameter_server":
        return False  # no TensorFlow import on the common path
    from tfrec.training.strategy import task_role

    return task_role()[0] in ("worker", "ps")


def run_server() -> int:
    """Serves this TF_CONFIG task (a PS worker or parameter server) until killed.

    The coordinator places variables on PS tasks and schedules steps on workers over
    gRPC; these processes run no Python training code of their own.
    """
    from tfrec.training.strategy import task_role, tf_config as read_tf_config

    task_type, index = task_role()
    cluster = (read_tf_config() or {}).get("cluster", {})
    if task_type not in ("worker", "ps") or index >= len(cluster.get(task_type, [])):
        raise ValueError(f"TF_CONFIG task {task_type!r} {index} is not a worker or ps of its "
                         f"cluster {sorted(cluster)}; cannot serve")
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (text steps run TF Text's case folding here)

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=task_type, task_index=index,
                                  protocol=resolver.rpc_layer or "grpc", start=True)
    print(f"{task_type} {index} serving on {cluster[task_type][index]} ({server.target})",
          flush=True)
    server.join()
    return 0
