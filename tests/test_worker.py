"""The warm site worker and its relay, as real processes: who may reach it, what it refuses, what it logs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune.client.audit import EgressLog
from fedtune.client.worker import WorkerError, parse_task, socket_path, wait_ready, worker_dir, write_relay
from fedtune.common.processes import ManagedProcess, child_env


def _relay(env: dict[str, str], state: Path, *extra: str) -> subprocess.CompletedProcess:
    relay = write_relay(state) / "flwr-clientapp"
    args = ["--runtime-api-address", "127.0.0.1:1", "--token", "ab" * 16, "--insecure", *extra]
    return subprocess.run([str(relay), *args], env=env, capture_output=True, text=True, timeout=60)


def test_worker_socket_is_for_the_site_user_only_and_one_worker_per_site(tmp_path: Path) -> None:
    from fedtune.client.agent import worker_command

    state = tmp_path / "state"
    worker = ManagedProcess(worker_command(state), tmp_path / "worker.log", env=child_env())
    try:
        wait_ready(socket_path(state), timeout=180, alive=worker.alive)
        assert stat.S_IMODE(socket_path(state).stat().st_mode) == 0o600
        assert stat.S_IMODE(worker_dir(state).stat().st_mode) == 0o700
        second = subprocess.run([*worker_command(state)], env=child_env(), capture_output=True, text=True, timeout=180)
        assert second.returncode != 0 and "already serves" in second.stderr, second.stderr
        # a task the worker refuses fails with the reason on the relay's stderr (the SuperNode log); the worker
        # stays up for the next task
        env = {**os.environ, "FEDTUNE_WORKER_SOCKET": str(socket_path(state))}
        refused = _relay(env, state, "--allow-runtime-dependency-installation")
        assert refused.returncode == 1 and "dependency installation" in refused.stderr, refused.stderr
        assert worker.alive()
        assert "ready on" in worker.log_text()
    finally:
        worker.stop(grace=5)
    # a stale socket left by a killed worker does not block the next one
    assert socket_path(state).exists()
    again = ManagedProcess(worker_command(state), tmp_path / "worker-2.log", env=child_env())
    try:
        wait_ready(socket_path(state), timeout=180, alive=again.alive)
    finally:
        again.stop(grace=5)


def test_relay_says_how_to_start_the_worker_when_it_is_absent(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FEDTUNE_WORKER_SOCKET"}
    unset = _relay(env, tmp_path)
    assert unset.returncode == 2 and "fedtune client start" in unset.stderr
    gone = _relay({**env, "FEDTUNE_WORKER_SOCKET": str(tmp_path / "none.sock"), "FEDTUNE_WORKER_WAIT": "1"}, tmp_path)
    assert gone.returncode == 3 and "not reachable" in gone.stderr and "fedtune client start" in gone.stderr


def test_relay_imports_neither_torch_nor_flower(tmp_path: Path) -> None:
    code = "import sys, fedtune.client.relay; print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_task_arguments_are_flowers_and_runtime_installs_are_refused() -> None:
    task = parse_task(["--runtime-api-address", "127.0.0.1:9094", "--token", "ff", "--insecure", "--parent-pid", "7"])
    assert (task.runtime_api_address, task.token, task.insecure) == ("127.0.0.1:9094", "ff", True)
    with pytest.raises(WorkerError, match="dependency installation"):
        parse_task(["--runtime-api-address", "a:1", "--token", "ff", "--allow-runtime-dependency-installation"])
    with pytest.raises(WorkerError, match=r"Flower 1\.42"):
        parse_task(["--runtime-api-address", "a:1", "--token", "ff", "--new-flag"])


def test_egress_log_lists_a_reply_as_sent_only_once_confirmed(tmp_path: Path) -> None:
    log = EgressLog(tmp_path / "egress.jsonl")
    content = RecordDict({"metrics": ConfigRecord({"epsilon": 1.0})})
    log.record(run="1", round_=1, kinds={"metrics": "metrics"}, content=content, delivered=False, spend=False)
    mark = log.mark()
    log.record(run="1", round_=2, kinds={"metrics": "metrics"}, content=content, delivered=False, spend=False)
    assert [e.delivered for e in log.entries()] == [False, False]
    confirmed = log.confirm(since=mark)
    assert len(confirmed) == 1
    # only the reply logged after the mark was taken by the SuperNode; the first one never left
    assert [(e.round, e.delivered) for e in log.entries()] == [(1, False), (2, True)]
    assert log.confirm(since=log.mark()) == []


def test_supernode_runs_flowers_code_with_short_polling_waits() -> None:
    """`client start` runs Flower's SuperNode through `fedtune.client.supernode`; its patch must hit Flower 1.42's
    own names (an upgrade that renames them fails here, not as a silently slow federation)."""
    import importlib
    import types

    from fedtune.client.agent import SupernodeOptions, supernode_command
    from fedtune.common import flower_waits

    opts = SupernodeOptions(
        superlink="127.0.0.1:9092",
        site_config=Path("site.toml"),
        root_certificates=None,
        auth_key=None,
        trusted_entities=None,
        insecure=True,
    )
    assert supernode_command(opts)[:3] == [sys.executable, "-m", "fedtune.client.supernode"]
    probe = """
import importlib, sys
from fedtune.common.flower_waits import shorten_supernode_waits
shorten_supernode_waits()
m = importlib.import_module("flwr.supernode.start_client_internal")
print(m.time.cap, m.pull_objects.keywords["initial_backoff"], m.time.monotonic() > 0)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(flower_waits.POLL_S), str(flower_waits.FIRST_BACKOFF_S), "True"], done.stderr
    with pytest.raises(RuntimeError, match=r"1\.42"):
        flower_waits.shorten(types.ModuleType("flwr.moved"), sleeps=True)
    assert importlib.import_module("flwr.superlink.grid.http_grid").pull_objects  # the ServerApp's patch target


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_that_asks_to_die_with_its_parent_does_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    """The site agent's SuperNode and worker (each calls `exit_with_parent` first) outlived a SIGKILLed agent,
    retrying a gone SuperLink and holding the runtime port; now the kernel ends them with it."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = "from fedtune.common.processes import exit_with_parent; exit_with_parent(); import time; time.sleep(60)"
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    agent = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # the child has imported and asked
        pid = int(pid_file.read_text())
        assert Path(f"/proc/{pid}").exists()
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
            assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
            time.sleep(0.1)
    finally:
        agent.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_an_error_reply_flower_raises_before_fedtune_s_handler_is_in_the_egress_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_spec
) -> None:
    """Review round 6: a message type the ClientApp lacks raised inside Flower, before fedtune's guarded handler
    could log its error reply, so the worker sent a reply the egress log did not list."""
    import hashlib
    from types import SimpleNamespace

    from flwr.app import Context, Message
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp

    from fedtune.client import worker
    from fedtune.client.audit import egress_path
    from fedtune.server.appbundle import build_bundle, federation_toml

    for attr, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", 5)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # what `_pull_task_input` sets from the task
    fed = tmp_path / "federation.toml"
    fed.write_text(federation_toml(tiny_spec))
    content = build_bundle(fed).content
    fab = SimpleNamespace(content=content, hash_str=hashlib.sha256(content).hexdigest())
    message = Message(RecordDict(), dst_node_id=5, message_type="train.no_such_stage")
    message.metadata.__dict__["_message_id"] = "m1"
    monkeypatch.setattr(
        worker, "_pull_task_input", lambda *_: (message, Context(7, 5, {}, RecordDict(), {}), None, fab)
    )
    pushed: list[Message] = []
    monkeypatch.setattr(run_clientapp, "push_message", lambda _client, reply, _context: pushed.append(reply))
    monkeypatch.setattr(run_clientapp, "push_task_output", lambda **_: None)
    state = tmp_path / "state"
    (state / "worker").mkdir(parents=True)
    worker.TaskRunner(state)._execute(object(), SimpleNamespace(max_tries=3))
    assert len(pushed) == 1 and pushed[0].has_error()
    (entry,) = EgressLog(egress_path(state)).entries()
    assert entry.kind == "error" and entry.delivered
