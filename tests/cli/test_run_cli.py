"""`coord run` end to end, as a real subprocess: status passthrough, signals, identity."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import coord_env, wait_line

import coord
from coord.instances import get_instance, list_instances

Cli = Callable[..., subprocess.CompletedProcess[str]]
COORD = [sys.executable, "-m", "coord"]


def run_bg(db: Path, procs: list[subprocess.Popen[str]], *args: str,
           **env: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([*COORD, "run", *args], env=coord_env(db, **env),
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    return p


def one_line_error(out: subprocess.CompletedProcess[str], code: int) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("coord: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_exit_status_passes_through(cli: Cli) -> None:
    assert cli("run", "--app", "t", "--", "sh", "-c", "exit 7").returncode == 7
    assert cli("run", "--app", "t", "--", "true").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGKILL, signal.SIGTERM])
def test_death_by_signal_is_128_plus_n(cli: Cli, sig: int) -> None:
    out = cli("run", "--app", "t", "--", "sh", "-c", f"kill -{int(sig)} $$")
    assert out.returncode == 128 + sig


def test_cmd_gets_db_and_a_fresh_id_and_is_deregistered(cli: Cli, store: coord.Store,
                                                        db_path: Path) -> None:
    out = cli("run", "--app", "t", "--", "sh", "-c",
              'echo "$COORD_DB"; echo "$COORD_INSTANCE_ID"; exec "$0" -m coord instance --json',
              sys.executable, env=coord_env(db_path, COORD_INSTANCE_ID="inherited"))
    assert out.returncode == 0, out.stderr
    db, id, detail = out.stdout.split("\n", 2)
    assert db == str(db_path)
    assert id != "inherited" and id.startswith("t-")  # never an inherited id
    info = json.loads(detail)  # asked from inside: the wrapper is its live instance
    assert (info["id"], info["alive"], info["app"]) == (id, True, "t")
    # Deregistered at the end: gone, with a clean 'left'.
    assert list_instances(store, include_dead=True) == []
    kinds = [r["kind"] for r in store.rows("SELECT kind FROM events WHERE instance_id = ?", (id,))]
    assert kinds[0] == "joined" and kinds[-1] == "left"


def test_nested_run_gets_its_own_id(cli: Cli, tmp_path: Path) -> None:
    inner = tmp_path / "inner.sh"
    inner.write_text(f'echo "inner=$COORD_INSTANCE_ID"\nexec {sys.executable} -m coord instances --json\n')
    outer = tmp_path / "outer.sh"
    outer.write_text(f'echo "outer=$COORD_INSTANCE_ID"\n'
                     f'exec {sys.executable} -m coord run --app inner -- sh {inner}\n')
    out = cli("run", "--app", "outer", "--", "sh", str(outer))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    ids = dict(line.split("=", 1) for line in lines[:2])
    assert ids["outer"] != ids["inner"]
    listed = json.loads(lines[-1])
    assert {r["id"] for r in listed} == {ids["outer"], ids["inner"]}
    assert all(r["alive"] for r in listed)


def test_instance_id_option_and_id_in_use(cli: Cli, db_path: Path,
                                          procs: list[subprocess.Popen[str]]) -> None:
    p = run_bg(db_path, procs, "--app", "t", "--instance-id", "fixed-1", "--",
               "sh", "-c", "echo ready; sleep 60")
    wait_line(p, timeout=60)
    one_line_error(cli("run", "--app", "t", "--instance-id", "fixed-1", "--", "true"), 1)
    p.terminate()
    assert p.wait(timeout=30) == 128 + signal.SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_are_forwarded(db_path: Path, procs: list[subprocess.Popen[str]],
                               sig: int) -> None:
    script = (f'trap "echo trapped; exit 0" {signal.Signals(sig).name[3:]}; echo ready; '
              "while :; do sleep 0.05; done")
    p = run_bg(db_path, procs, "--app", "t", "--", "sh", "-c", script)
    wait_line(p, timeout=60)
    p.send_signal(sig)
    assert p.wait(timeout=30) == 0  # CMD trapped it and exited 0: so does coord run
    assert p.stdout is not None and p.stdout.read().strip() == "trapped"


def test_untrapped_term_ends_cmd_and_reports_it(db_path: Path,
                                                procs: list[subprocess.Popen[str]]) -> None:
    p = run_bg(db_path, procs, "--app", "t", "--", "sh", "-c", "echo ready; exec sleep 60")
    wait_line(p, timeout=60)
    p.terminate()
    assert p.wait(timeout=30) == 128 + signal.SIGTERM


def test_sigkill_of_the_wrapper_is_seen_at_once(store: coord.Store, db_path: Path,
                                                procs: list[subprocess.Popen[str]]) -> None:
    """The wrapper is SIGKILLed: its instance is dead at once, CMD dies with it (parent-death
    signal), and one reap ends what CMD left in its group and removes the instance."""
    p = run_bg(db_path, procs, "--app", "t", "--instance-id", "wrapped", "--",
               "sh", "-c", 'sleep 60 & echo "ready $$ $!"; wait')
    _, child, bg = wait_line(p, timeout=60).split()
    try:
        assert get_instance(store, "wrapped").alive
        # CMD may print before the wrapper has recorded its child; wait for the row.
        deadline = time.monotonic() + 30
        while not store.value("SELECT count(*) FROM processes WHERE instance_id = 'wrapped' "
                              "AND pid = ?", (int(bg),)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p.kill()
        p.wait()
        info = get_instance(store, "wrapped")  # no TTL wait: the wrapper's lock is gone
        assert (info.alive, info.status) == (False, "died")
        report = coord.reap(store)
        assert [d["id"] for d in report.dead] == ["wrapped"] and report.trees_ended == 1
        assert _gone(int(child)) and _gone(int(bg))
        with pytest.raises(coord.NotFound):
            get_instance(store, "wrapped")
    finally:
        for pid in (int(child), int(bg)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_cmd_that_cannot_start(cli: Cli, tmp_path: Path) -> None:
    one_line_error(cli("run", "--app", "t", "--", "no-such-command-xyz"), 127)
    plain = tmp_path / "not-executable"
    plain.write_text("echo hi\n")
    one_line_error(cli("run", "--app", "t", "--", str(plain)), 126)
    missing = cli("run", "--app", "t")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_interactive_cmd_gets_the_terminal(db_path: Path) -> None:
    """Under a terminal, CMD's group is the foreground one: it can read the terminal and a
    Ctrl-C reaches it (once, directly)."""
    code = ("import os, time; print('fg', os.tcgetpgrp(0) == os.getpgrp(), flush=True); "
            "time.sleep(60)")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader whose terminal is the pty
        os.execve(sys.executable, [*COORD, "run", "--app", "tty", "--", sys.executable, "-c", code],
                  coord_env(db_path))
    try:
        out = b""
        deadline = time.monotonic() + 60
        while b"fg " not in out or not out.rstrip().endswith((b"True", b"False")):
            assert time.monotonic() < deadline, out
            if select.select([fd], [], [], 1)[0]:
                out += os.read(fd, 1024)
        assert b"fg True" in out
        os.write(fd, b"\x03")  # Ctrl-C
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGINT
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        except ProcessLookupError:
            pass
        os.close(fd)


def test_run_instances_elect_one_reaper_among_themselves(
        db_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    from conftest import wait_until

    from coord.leases import get_lease

    env = {"COORD_HEARTBEAT": "0.2", "COORD_INSTANCE_TTL": "2"}
    for i in range(3):
        run_bg(db_path, procs, "--app", "t", "--instance-id", f"r{i}", "--",
               "sh", "-c", 'echo "ready $$"; exec sleep 60', **env)
    for p in procs:
        wait_line(p, timeout=60)
    s = coord.Store(db_path)
    holder = wait_until(lambda: get_lease(s, "coord/reaper").holder, timeout=30)
    assert holder in {"r0", "r1", "r2"}
    # The elected reaper buries a dead instance by itself: no cron, no explicit reap.
    victim = coord.register(s, "victim", app="t", heartbeat=False, handle_signals=False)
    s.write(lambda c: c.execute("UPDATE instances SET heartbeat_mono = 0 WHERE id = 'victim'"))
    wait_until(lambda: s.row("SELECT 1 FROM instances WHERE id = 'victim'") is None, timeout=30)
    victim.close()
    s.close()
