"""Exercises 2 and 3 under torchrun across two hosts: two network namespaces joined by a veth pair stand for
two machines (their own interfaces, addresses and ports; this machine's filesystem shared, as the README
asks of output_dir). One process per host, c10d rendezvous, gloo over the link. The run must give one run
folder whose metrics equal the two-process run on one host, with every checkpoint written once, by one host.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, read_results, torchrun_two_processes
from tools import assets, build_tiny_clip
import test_exercise_2
import test_exercise_3

pytestmark = pytest.mark.slow

STORE_PORT = 29500     # inside the namespaces, which nothing else uses: no collision with other runs


# a file (or a file inside a folder) written under faults.replace_whole's hidden temporary name, then renamed
TEMPORARY = re.compile(r"^\.(.+)\.\d+-[0-9a-f]{8}\.tmp$")


def whole_name(path: Path) -> Path:
    """The name a written file has once its temporary name is renamed into place."""
    return Path(*(TEMPORARY.sub(r"\1", part) for part in path.parts))


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str     # this host's end of the veth pair: GLOO_SOCKET_IFNAME
    address: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces named for this pid (concurrent runs never share one), a veth pair created straight
    inside them (its ends never exist in this machine's own namespace) with a private /30, loopback up."""
    tag = f"lab2h{os.getpid()}"        # + a/b: also the interface names, which may have 15 characters
    pair = (Host(f"{tag}a", f"{tag}a", "10.231.0.1"), Host(f"{tag}b", f"{tag}b", "10.231.0.2"))
    made = []
    try:
        for host in pair:
            try:
                ip("netns", "add", host.namespace)
            except (OSError, subprocess.CalledProcessError) as error:
                pytest.skip(f"cannot create a network namespace: {getattr(error, 'stderr', None) or error}")
            made.append(host.namespace)
        a, b = pair
        ip("link", "add", a.interface, "netns", a.namespace, "type", "veth", "peer", "name", b.interface,
           "netns", b.namespace)
        for host in pair:
            ip("-n", host.namespace, "addr", "add", f"{host.address}/30", "dev", host.interface)
            ip("-n", host.namespace, "link", "set", host.interface, "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
        yield pair
    finally:
        for namespace in made:          # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


class WriteWatch:
    """Which host wrote each file under `root`: fanotify reports every file closed after writing, with the
    writer's pid, whose network namespace names its host. The mark is on the whole filesystem because
    `ip netns exec` gives each host a copy of this machine's mounts, which a mark on one mount would miss."""

    FAN_CLOEXEC, FAN_NONBLOCK, FAN_UNLIMITED_QUEUE = 0x1, 0x2, 0x10
    FAN_CLOSE_WRITE, FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x8, 0x1, 0x100
    EVENT = struct.Struct("IBBHQii")   # struct fanotify_event_metadata

    def __init__(self, root: Path, hosts: tuple[Host, ...]):
        self.root = str(root)
        self.namespaces = {os.stat(f"/run/netns/{host.namespace}").st_ino: host.namespace for host in hosts}
        self.writes = defaultdict(Counter)      # path under root -> Counter(writer's host: times written)
        self.hosts = {}                         # pid -> its host's namespace, or why it is not known
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        # unlimited queue: the whole filesystem's writes (other programs' too) queue up, and none may be dropped
        self.fd = libc.fanotify_init(self.FAN_CLOEXEC | self.FAN_NONBLOCK | self.FAN_UNLIMITED_QUEUE,
                                     os.O_RDONLY | os.O_LARGEFILE)
        if self.fd < 0 or libc.fanotify_mark(self.fd, self.FAN_MARK_ADD | self.FAN_MARK_FILESYSTEM,
                                             self.FAN_CLOSE_WRITE, -1, self.root.encode()) < 0:
            error = ctypes.get_errno()
            if self.fd >= 0:
                os.close(self.fd)
            pytest.skip(f"cannot watch which host writes the files (fanotify): {os.strerror(error)}")
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        while True:
            stopping = self.stopped.is_set()     # one more pass after stop() drains what is queued
            while poll.poll(0 if stopping else 100):
                try:
                    buffer = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                offset = 0
                while offset < len(buffer):
                    length, _, _, _, _, fd, pid = self.EVENT.unpack_from(buffer, offset)
                    offset += length
                    if fd >= 0:
                        self._record(fd, pid)
            if stopping:
                return

    def _record(self, fd: int, pid: int):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")  # rotated checkpoints count too
        finally:
            os.close(fd)
        if not path.startswith(self.root + os.sep):
            return                      # another file on this filesystem: other tests, other programs
        if pid not in self.hosts:       # remembered: a worker may exit before its last writes are read here
            try:
                namespace = os.stat(f"/proc/{pid}/ns/net").st_ino
                self.hosts[pid] = self.namespaces.get(namespace, f"another namespace ({namespace})")
            except OSError:
                self.hosts[pid] = f"pid {pid}, exited before its first write was read"
        self.writes[whole_name(Path(path).relative_to(self.root))][self.hosts[pid]] += 1

    def stop(self) -> dict:
        """Stop watching (again: a no-op); what was written, and by which host."""
        self.stopped.set()
        self.thread.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return self.writes


def torchrun_commands(hosts: tuple[Host, ...], script: str, args: list[str], rdzv_id: str) -> list[list[str]]:
    """Each host's torchrun command, as a user types it on that machine. c10d assigns the node ranks, in the
    order of --local_addr, and rank 0 serves the workers' store at its --local_addr: without it, at the
    address this machine's hostname resolves to, which the other namespace cannot reach. The endpoint is an
    address, not this machine's hostname, so the first host is told it serves the rendezvous (is_host)."""
    first = hosts[0]
    return [["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint={first.address}:{STORE_PORT}", f"--rdzv_id={rdzv_id}", f"--local_addr={host.address}",
             *(["--rdzv_conf=is_host=1"] if host is first else []), script, *args] for host in hosts]


def run_on_two_hosts(hosts: tuple[Host, ...], commands: list[list[str]], logs: Path, timeout: int) -> None:
    """Start both hosts' commands (torchrun as `python -m torch.distributed.run`, from this venv) and wait for
    both; a failure on one host stops the other, which would otherwise wait out the rendezvous timeout."""
    processes = []
    for host, command in zip(hosts, commands):
        # gloo would otherwise offer the address this machine's hostname resolves to (here 127.0.0.1)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": host.interface,
               "LAB_SHARED_DIR": str(assets.shared_dir())}
        log = open(logs / f"{host.namespace}.log", "w")
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, sys.executable, "-m", "torch.distributed.run", *command[1:]],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process in processes) and time.monotonic() < deadline \
            and not any(process.returncode for process in processes):
        time.sleep(0.5)
    for process in processes:
        if process.poll() is None:      # its own session: torchrun and its worker
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    tails = "\n".join(f"--- {host.namespace} (exit {process.returncode}): {' '.join(command)}\n"
                      f"{(logs / f'{host.namespace}.log').read_text()[-3000:]}"
                      for host, command, process in zip(hosts, commands, processes))
    assert all(process.returncode == 0 for process in processes), tails


def flat(tree, prefix: str = ""):
    """(dotted key, value) for each leaf of nested dicts and lists."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        yield prefix, tree
    for key, value in items or ():
        yield from flat(value, f"{prefix}.{key}" if prefix else str(key))


def files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def check_same_run(two_hosts_dir: Path, one_host_dir: Path, checkpoints: str, writes: dict, hosts) -> dict:
    """The two-host run folder against the one-host one: metrics, steps, and the same checkpoints, each
    complete and written by the host of global rank 0 alone, bar the other's RNG state. Returns its results."""
    results, expected = read_results(two_hosts_dir), read_results(one_host_dir)
    assert results["training"]["processes"] == 2
    assert results["training"]["global_step"] == expected["training"]["global_step"]
    metrics, expected_metrics = dict(flat(results["metrics"])), dict(flat(expected["metrics"]))
    assert metrics.keys() == expected_metrics.keys()
    differ = {key: (metrics[key], expected_metrics[key]) for key in metrics
              if not math.isclose(metrics[key], expected_metrics[key], rel_tol=0, abs_tol=1e-6)}
    assert not differ, f"two hosts vs one host: {differ}"

    folders = sorted(path.name for path in (two_hosts_dir / checkpoints).glob("checkpoint-*"))
    assert folders and folders == sorted(path.name for path in (one_host_dir / checkpoints).glob("checkpoint-*"))
    for folder in folders:              # complete: trainer_state.json comes last, each process's RNG state
        listed = files(two_hosts_dir / checkpoints / folder)
        assert listed == files(one_host_dir / checkpoints / folder), folder
        assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= set(listed), folder
    assert not [name for name in files(two_hosts_dir) if name.endswith(".tmp")]   # no partial results left

    first, second = (host.namespace for host in hosts)
    unseen = {Path(two_hosts_dir.name) / checkpoints / folder / name for folder in folders
              for name in files(two_hosts_dir / checkpoints / folder)} - writes.keys()
    assert not unseen, f"the watch missed these writes: {sorted(map(str, unseen))}"
    by_host = {str(path): dict(writers) for path, writers in writes.items()}
    wrong = {path: writers for path, writers in by_host.items()
             if writers != {second if Path(path).name == "rng_state_1.pth" else first: 1}}
    assert not wrong, f"files written more than once, by the wrong host or by both: {wrong}"
    return results


@pytest.fixture
def shared_output(tmp_path, hosts):
    """The output_dir both hosts write to, and the watch on who writes there."""
    output_dir = tmp_path / "two-hosts"
    output_dir.mkdir()
    watch = WriteWatch(output_dir, hosts)
    yield output_dir, watch
    watch.stop()


def test_exercise_2_on_two_hosts_matches_one_host(hosts, shared_output, tiny_distilbert, rt_dir, tmp_path):
    """12 steps (2 epochs of 96 examples in global batches of 16), evaluated and saved every 4, 2 kept."""
    output_dir, watch = shared_output
    _, one_host = torchrun_two_processes("exercise_2.py", test_exercise_2.tiny_args(
        tiny_distilbert, rt_dir, tmp_path / "one-host"), tmp_path / "one-host", timeout=300)
    commands = torchrun_commands(hosts, "exercise_2.py", test_exercise_2.tiny_args(tiny_distilbert, rt_dir, output_dir),
                                 rdzv_id=f"rt-{os.getpid()}")
    run_on_two_hosts(hosts, commands, tmp_path, timeout=300)
    (run_dir,) = output_dir.iterdir()   # one run folder, named by the first host and broadcast
    assert list(output_dir.rglob("results.json")) == [run_dir / "results.json"]
    results = check_same_run(run_dir, one_host, ".", watch.stop(), hosts)
    assert results["best_checkpoint"].rsplit("/", 1)[1] == read_results(one_host)["best_checkpoint"].rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    return build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))


def test_exercise_3_on_two_hosts_matches_one_host(hosts, shared_output, tiny_clip_dir, tiny_imagenet_dir, tmp_path):
    """The CLIP loss gathers features across the hosts; 4 steps, a checkpoint every 2 (save_steps=2)."""
    output_dir, watch = shared_output
    _, one_host = torchrun_two_processes("exercise_3.py", test_exercise_3.tiny_args(
        tiny_clip_dir, tiny_imagenet_dir, tmp_path / "one-host", save_steps=2), tmp_path / "one-host", timeout=300)
    commands = torchrun_commands(hosts, "exercise_3.py", test_exercise_3.tiny_args(
        tiny_clip_dir, tiny_imagenet_dir, output_dir, save_steps=2), rdzv_id=f"clip-{os.getpid()}")
    run_on_two_hosts(hosts, commands, tmp_path, timeout=300)
    (run_dir,) = (path for path in output_dir.iterdir() if path.name != "cache")   # the probe's features beside it
    assert list(output_dir.rglob("results.json")) == [run_dir / "results.json"]
    check_same_run(run_dir, one_host, "checkpoints", watch.stop(), hosts)
    assert len(list((output_dir / "cache").glob("features-*.safetensors"))) == 2     # train and validation, once
