"""torch's CPU threads: the rule that picks them from the cores other programs leave free
(tested with the affinity, /proc/stat and the load average faked), `--threads` on every command
that runs a model, and run.json / eval.json saying how many computed."""

import json
import shutil

import pytest
import torch

from tunelab import cores, device
from tunelab.cli import main
from tunelab.errors import UserError


@pytest.fixture(autouse=True)
def _threads_restored(monkeypatch):
    kept = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield
    torch.set_num_threads(kept)


@pytest.mark.parametrize(("cores", "busy", "threads"), [
    (2, 0.0, 2), (2, 0.2, 2),  # the odd background task leaves both cores
    (2, 1.0, 1), (2, 0.6, 1),  # a busy program, or most of one, takes a core
    (2, 2.0, 1), (1, 3.0, 1),  # never fewer than one
    (8, 2.4, 5), (8, 1.9, 6), (4, 0.0, 4)])
def test_the_rule_counts_the_cores_left_idle(cores, busy, threads):
    assert device.thread_count(cores, busy) == threads


class FakeClock:
    """time for busy_cores: a sampling window of `wall` seconds in which this process used `own`."""

    def __init__(self, wall: float, own: float):
        self.wall, self.own, self.now, self.cpu = wall, own, 0.0, 0.0

    def sleep(self, seconds):
        self.now += self.wall
        self.cpu += self.own

    def monotonic(self):
        return self.now

    def process_time(self):
        return self.cpu


def fake_machine(monkeypatch, affinity, before, after, wall=0.1, own=0.0):
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
    monkeypatch.setattr(cores, "cpu_quota", lambda: None)  # the machine running the tests may have one
    samples = iter([before, after])
    monkeypatch.setattr(device, "cpu_times", lambda cpus: {c: t for c, t in next(samples).items() if c in cpus})
    monkeypatch.setattr(device, "time", FakeClock(wall, own))


def test_free_cores_are_measured_on_this_process_s_cores(monkeypatch):
    # (busy, total) ticks: cpu0 fully busy over the window, cpu1 and cpu2 idle, cpu3 busy but not ours.
    before = {0: (100, 1000), 1: (100, 1000), 2: (100, 1000), 3: (100, 1000)}
    after = {0: (110, 1010), 1: (100, 1010), 2: (101, 1010), 3: (110, 1010)}
    fake_machine(monkeypatch, {0, 1, 2}, before, after)
    assert device.busy_cores(3) == pytest.approx(1.1)
    fake_machine(monkeypatch, {0, 1, 2}, before, after)
    assert device.free_cores() == 2


@pytest.mark.parametrize(
    ("v2", "v1", "period", "quota"),
    [
        ("max 100000\n", None, None, None),  # v2, no quota
        ("150000 100000\n", None, None, 1.5),  # docker run --cpus 1.5
        (None, "-1\n", "100000\n", None),  # v1, no quota
        (None, "200000\n", "100000\n", 2.0),
        ("garbage\n", None, None, None),
        (None, None, None, None),  # not Linux, or no cgroup files
    ],
)
def test_a_container_s_cpu_quota_is_read_from_cgroup_v2_or_v1(tmp_path, v2, v1, period, quota):
    root = tmp_path / "cgroup"
    v2_file, v1_file = root / "cpu.max", root / "cpu" / "cpu.cfs_quota_us"
    v1_file.parent.mkdir(parents=True)
    for file, text in ((v2_file, v2), (v1_file, v1), (v1_file.parent / "cpu.cfs_period_us", period)):
        if text is not None:
            file.write_text(text)
    membership = tmp_path / "self-cgroup"
    membership.write_text("0::/\n" if v1 is None else "4:memory:/\n2:cpu,cpuacct:/\n")  # a cgroup namespace
    assert cores.cpu_quota(root, membership) == quota
    assert cores.cpu_quota(root, tmp_path / "not-linux") == quota


def test_the_quota_of_the_process_s_own_cgroup_or_one_above_it_counts(tmp_path):
    """No cgroup namespace (`systemd-run -p CPUQuota=150%`, a pod that shares the host's view):
    /proc/self/cgroup names the process's cgroup, whose quota is not in the root folder."""
    root, membership = tmp_path / "cgroup", tmp_path / "self-cgroup"
    own = root / "system.slice" / "job.service"
    own.mkdir(parents=True)
    (own / "cpu.max").write_text("max 100000\n")
    membership.write_text("0::/system.slice/job.service\n")
    assert cores.cpu_quota(root, membership) is None
    (own.parent / "cpu.max").write_text("150000 100000\n")  # the slice above it caps it
    assert cores.cpu_quota(root, membership) == 1.5
    (own / "cpu.max").write_text("50000 100000\n")  # and its own smaller one wins
    assert cores.cpu_quota(root, membership) == 0.5
    v1 = root / "cpu" / "kubepods" / "pod1"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    membership.write_text("5:memory:/kubepods/pod1\n3:cpu,cpuacct:/kubepods/pod1\n")
    assert cores.cpu_quota(root, membership) == 3.0


def test_the_quota_caps_the_usable_cores_below_the_affinity(monkeypatch):
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cores, "cpu_quota", lambda: 1.5)
    assert cores.usable_cores() == 2
    monkeypatch.setattr(cores, "cpu_quota", lambda: 0.2)
    assert cores.usable_cores() == 1
    monkeypatch.setattr(cores, "cpu_quota", lambda: None)
    assert cores.usable_cores() == 16


def test_this_process_s_own_work_is_not_counted_as_busy(monkeypatch):
    before = {0: (0, 100), 1: (0, 100)}
    after = {0: (10, 110), 1: (0, 110)}  # cpu0 busy all the window: with this process's own thread
    fake_machine(monkeypatch, {0, 1}, before, after, wall=0.1, own=0.1)
    assert device.busy_cores(2) == pytest.approx(0.0)


def test_without_proc_stat_the_load_average_counts(monkeypatch):
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cores, "cpu_quota", lambda: None)
    monkeypatch.setattr(device, "cpu_times", lambda cpus: {})
    monkeypatch.setattr(device.os, "getloadavg", lambda: (2.5, 1.0, 1.0))
    assert device.free_cores() == 1
    monkeypatch.setattr(device.os, "getloadavg", lambda: (0.1, 1.0, 1.0))
    assert device.free_cores() == 4


def test_cpu_times_reads_this_machine():
    if not hasattr(device.os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mine = device.os.sched_getaffinity(0)
    times = device.cpu_times(mine)
    assert set(times) == mine and all(0 <= busy <= total for busy, total in times.values())
    assert 0 <= device.busy_cores(len(mine), seconds=0.05) <= len(mine)
    assert 1 <= device.free_cores(seconds=0.05) <= len(mine)


def test_threads_given_win_over_the_rule_and_omp_num_threads(monkeypatch):
    monkeypatch.setattr(device, "free_cores", lambda: pytest.fail("measured although --threads was given"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert device.configure_threads(3) == 3 == torch.get_num_threads()
    torch.set_num_threads(2)
    assert device.configure_threads() == 2 == torch.get_num_threads()  # the environment's own setting
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(device, "free_cores", lambda: 1)
    assert device.configure_threads() == 1 == torch.get_num_threads()


def test_processes_launched_together_share_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(device, "usable_cores", lambda: 4)
    monkeypatch.setattr(device, "free_cores", lambda: pytest.fail("siblings starting up would count as load"))
    assert device.configure_threads() == 2


@pytest.mark.parametrize("threads", [0, -1])
def test_no_threads_is_refused(threads):
    with pytest.raises(UserError, match=f"--threads {threads}: must be 1 or more"):
        device.configure_threads(threads)


@pytest.mark.parametrize("command", [["train", "data.jsonl"], ["eval", "RUN"], ["generate", "RUN", "--prompt", "x"],
                                     ["chat", "RUN"], ["serve", "RUN"], ["demo"]])
@pytest.mark.parametrize("threads", ["0", "-2"])
def test_every_command_that_runs_a_model_refuses_no_threads(command, threads, capsys):
    assert main([*command, "--threads", threads]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tunelab: error: --threads {threads}: must be greater than or equal to 1"


def test_threads_reach_torch_and_eval_json(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval.json"))
    torch.set_num_threads(2)
    assert main(["generate", str(run), "--prompt", "Country of Rome?", "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(["eval", str(run), "--no-base", "--no-forgetting", "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert json.loads((run / "eval.json").read_text())["threads"] == 1 == torch.get_num_threads()


def test_run_json_says_the_device_and_threads_of_training(tiny_model_dir, write_jsonl, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say {i}", "completion": str(i)} for i in range(8)])
    torch.set_num_threads(2)
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--base", str(tiny_model_dir),
                 "--max-steps", "1", "--batch-size", "4", "--test-size", "2", "--threads", "1"]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["device"] == "cpu" and info["threads"] == 1 == torch.get_num_threads()
