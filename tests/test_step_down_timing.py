"""The step-down timing rule: a holder that can no longer renew ends CMD's tree (renew
deadline, then TERM, the kill grace, KILL and the KILL wait) strictly before anyone may take
its lease over by TTL — timings that cannot order these are refused with one line, on every
engine, before anything runs."""

from __future__ import annotations

import pytest
from conftest import coord_env, run_cli

from coord.config import KILL_WAIT, Config
from coord.errors import InvalidArgument

pytestmark = pytest.mark.contract


def test_the_defaults_pass_with_room() -> None:
    cfg = Config()
    cfg.check_step_down()
    spent = cfg.renew_deadline_for(cfg.lease_ttl) + cfg.kill_grace + KILL_WAIT
    assert spent < cfg.lease_ttl and cfg.renew_deadline < cfg.lease_ttl
    # The old defaults (10 s + 5 s + 2 s against a 15 s TTL) are refused.
    with pytest.raises(InvalidArgument, match="not below the lease TTL"):
        Config(renew_deadline=10.0, kill_grace=5.0).check_step_down()


@pytest.mark.parametrize(("ttl", "grace", "ok"), [
    (15.0, 3.0, True),   # 8 + 3 + 2 = 13 < 15
    (15.0, 5.0, False),  # 8 + 5 + 2 = 15: not below
    (6.0, 0.0, False),   # 4 (2/3 of the TTL) + 0 + 2 = 6
    (6.1, 0.0, True),
    (3.0, 1.0, False),
])
def test_the_rule_at_its_edges(ttl: float, grace: float, ok: bool) -> None:
    cfg = Config()
    if ok:
        cfg.check_step_down(ttl, grace)
    else:
        with pytest.raises(InvalidArgument) as e:
            cfg.check_step_down(ttl, grace)
        assert "\n" not in str(e.value) and "lease TTL" in str(e.value)


def test_a_server_timeout_counts_as_well() -> None:
    Config().check_step_down(15.0, 3.0, server_timeout=14.0)
    with pytest.raises(InvalidArgument, match="not below the server timeout"):
        Config().check_step_down(15.0, 3.0, server_timeout=13.0)


def test_the_instance_ttl_counts_with_its_own_renew_deadline() -> None:
    # A lease of 30 s (deadline 8 s) on an instance of 12 s (deadline 8 s): 13 s is not
    # below 12 s, though it is below the lease's TTL.
    Config().check_step_down(30.0, 3.0, instance_ttl=15.0)
    with pytest.raises(InvalidArgument, match="not below the instance TTL"):
        Config().check_step_down(30.0, 3.0, instance_ttl=12.0)
    # A short instance TTL has a short renew deadline of its own (2/3 of it).
    Config(renew_deadline=100).check_step_down(30.0, 1.0, instance_ttl=10.0)


def test_elect_and_lock_refuse_such_timings_before_running(db_path: object) -> None:
    short = coord_env(db_path, COORD_LEASE_TTL="3")  # type: ignore[arg-type]
    for args in (["elect", "t/x", "--ttl", "3", "--grace", "1"], ["lock", "t/y"]):
        r = run_cli(db_path, *args, "--", "sh", "-c", "echo ran", env=short)  # type: ignore[arg-type]
        assert r.returncode != 0 and "ran" not in r.stdout
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "timings refused" in lines[0], r.stderr
    # The same command with timings that fit runs.
    r = run_cli(db_path, "elect", "t/x", "--ttl", "8", "--grace", "0.5", "--",  # type: ignore[arg-type]
                "sh", "-c", "echo ran")
    assert r.returncode == 0 and r.stdout.strip() == "ran", r.stderr


def test_a_ttl_or_grace_out_of_range_is_named_as_such(db_path: object) -> None:
    for flag, value, said in (("--ttl", "-1", "lease ttl must be a positive number"),
                              ("--ttl", "0", "lease ttl must be a positive number"),
                              ("--grace", "-1", "kill grace must be zero or more")):
        r = run_cli(db_path, "elect", "t/z", flag, value, "--",  # type: ignore[arg-type]
                    "sh", "-c", "echo ran")
        assert r.returncode == 2 and "ran" not in r.stdout, (r.stdout, r.stderr)
        assert r.stderr.startswith(f"coord: {said}") and r.stderr.count("\n") == 1, r.stderr


def test_on_postgresql_the_instance_ttl_is_the_server_timeout(db_path: object,
                                                               engine: str) -> None:
    # The liveness session's server-side timeouts follow the instance TTL there.
    env = coord_env(db_path, COORD_INSTANCE_TTL="5")  # type: ignore[arg-type]
    r = run_cli(db_path, "elect", "t/z", "--", "sh", "-c", "echo ran", env=env)  # type: ignore[arg-type]
    if engine == "postgresql":
        assert r.returncode != 0 and "server timeout" in r.stderr and "ran" not in r.stdout
    else:
        assert r.returncode == 0 and r.stdout.strip() == "ran", r.stderr
