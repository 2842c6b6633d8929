"""coord.paths: where the database lives and the refusals that keep it private.

Everything runs on the real filesystem under tmp_path. Tests run as root, and root ignores file
modes, so "another user" means chown to nobody; the checks read st_uid/st_mode, so they still
bite. The /run/user and /tmp roots are module constants pointed at tmp_path.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coord import paths
from coord.errors import UnsafePath
from coord.paths import (
    create_db_file,
    default_db_path,
    fs_type,
    is_network_fs,
    mount_fs_type,
    parse_mountinfo,
    prepare_db_path,
    private_dir,
    resolve_db_path,
)

UID = os.geteuid()
try:
    NOBODY = pwd.getpwnam("nobody").pw_uid
except KeyError:
    NOBODY = 65534


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """Fake /run/user and /tmp, so no test touches the machine's real ones."""
    run_user = tmp_path / "run" / "user"
    run_user.mkdir(parents=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    monkeypatch.setattr(paths, "_RUN_USER", run_user)
    monkeypatch.setattr(paths, "_TMP", tmp)
    yield run_user, tmp


@pytest.fixture
def private(tmp_path: Path) -> Path:
    """A directory that passes the checks: ours, 0700."""
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    d.chmod(0o700)
    return d


def make_runtime_dir(run_user: Path, uid: int = UID, mode: int = 0o700) -> Path:
    d = run_user / str(uid)
    d.mkdir()
    d.chmod(mode)
    return d


def snapshot(p: Path) -> tuple[object, ...]:
    """Everything that would show that a refusal touched the path."""
    st = os.lstat(p)
    body: bytes | str | None = None
    if stat.S_ISREG(st.st_mode):
        body = p.read_bytes()
    elif stat.S_ISLNK(st.st_mode):
        body = os.readlink(p)
    return (body, st.st_mode, st.st_uid, st.st_ino, st.st_size, st.st_mtime_ns)


def refused(path: Path, reason: str, *, env: dict[str, str] | None = None) -> UnsafePath:
    """Assert prepare_db_path refuses with a message naming the offender and the reason."""
    with pytest.raises(UnsafePath) as info:
        prepare_db_path(path, env=env if env is not None else {})
    msg = str(info.value)
    assert msg.startswith("refusing "), msg
    assert reason in msg, msg
    return info.value


# -- precedence ------------------------------------------------------------------------------


def test_coord_db_env_wins(roots: tuple[Path, Path]) -> None:
    make_runtime_dir(roots[0])
    env = {"COORD_DB": "/data/q.db", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_db_path(env) == Path("/data/q.db")


def test_xdg_runtime_dir_next(roots: tuple[Path, Path]) -> None:
    make_runtime_dir(roots[0])
    assert default_db_path({"XDG_RUNTIME_DIR": "/x/rt"}) == Path("/x/rt/coord/coord.db")


def test_empty_coord_db_and_relative_xdg_are_ignored(roots: tuple[Path, Path]) -> None:
    _, tmp = roots
    env = {"COORD_DB": "", "XDG_RUNTIME_DIR": "relative/dir"}
    assert default_db_path(env) == tmp / f"coord-{UID}" / "coord.db"


def test_run_user_used_when_valid(roots: tuple[Path, Path]) -> None:
    rt = make_runtime_dir(roots[0])
    assert default_db_path({}) == rt / "coord" / "coord.db"


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o711])
def test_run_user_skipped_unless_0700(roots: tuple[Path, Path], mode: int) -> None:
    run_user, tmp = roots
    make_runtime_dir(run_user, mode=mode)
    assert default_db_path({}) == tmp / f"coord-{UID}" / "coord.db"


def test_run_user_skipped_when_owned_by_another(roots: tuple[Path, Path]) -> None:
    run_user, tmp = roots
    os.chown(make_runtime_dir(run_user), NOBODY, -1)
    assert default_db_path({}) == tmp / f"coord-{UID}" / "coord.db"


def test_run_user_skipped_when_symlink(roots: tuple[Path, Path], tmp_path: Path) -> None:
    run_user, tmp = roots
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (run_user / str(UID)).symlink_to(real)
    assert default_db_path({}) == tmp / f"coord-{UID}" / "coord.db"


def test_tmp_fallback_when_no_runtime_dir(roots: tuple[Path, Path]) -> None:
    _, tmp = roots
    assert default_db_path({}) == tmp / f"coord-{UID}" / "coord.db"


def test_cron_resolves_same_path_as_session(roots: tuple[Path, Path]) -> None:
    rt = make_runtime_dir(roots[0])
    session = {"XDG_RUNTIME_DIR": str(rt), "HOME": "/root", "DISPLAY": ":0"}
    cron = {"HOME": "/root", "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh"}
    assert resolve_db_path(None, cron) == resolve_db_path(None, session)
    assert resolve_db_path(None, cron) == rt / "coord" / "coord.db"


def test_default_uses_os_environ(roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORD_DB", "/from/environ.db")
    assert default_db_path() == Path("/from/environ.db")


def test_explicit_wins_over_env() -> None:
    assert resolve_db_path("/flag.db", {"COORD_DB": "/env.db"}) == Path("/flag.db")
    assert resolve_db_path(Path("/flag.db"), {"COORD_DB": "/env.db"}) == Path("/flag.db")
    assert resolve_db_path(None, {"COORD_DB": "/env.db"}) == Path("/env.db")


def test_resolve_makes_absolute_without_following_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "target.db").write_bytes(b"x")
    (tmp_path / "link.db").symlink_to(tmp_path / "target.db")
    monkeypatch.chdir(tmp_path)
    assert resolve_db_path("link.db", {}) == tmp_path / "link.db"
    assert resolve_db_path(None, {"COORD_DB": "rel/q.db"}) == tmp_path / "rel" / "q.db"


# -- coord's own directories ---------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o277])
def test_default_dir_created_0700_whatever_the_umask(
    roots: tuple[Path, Path], tmp_path: Path, umask: int
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    old = os.umask(umask)
    try:
        db = prepare_db_path(resolve_db_path(None, env), env=env)
    finally:
        os.umask(old)
    assert db == xdg / "coord" / "coord.db"
    st = os.lstat(xdg / "coord")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == UID
    assert not db.exists()  # the directory is prepared; SQLite creates the file


def test_tmp_fallback_dir_created_0700(roots: tuple[Path, Path]) -> None:
    _, tmp = roots
    db = prepare_db_path(resolve_db_path(None, {}), env={})
    assert db.parent == tmp / f"coord-{UID}"
    assert stat.S_IMODE(os.lstat(db.parent).st_mode) == 0o700


def test_run_user_dir_created_0700(roots: tuple[Path, Path]) -> None:
    rt = make_runtime_dir(roots[0])
    db = prepare_db_path(resolve_db_path(None, {}), env={})
    assert db.parent == rt / "coord"
    assert stat.S_IMODE(os.lstat(db.parent).st_mode) == 0o700


def test_existing_own_dir_tightened_to_0700(roots: tuple[Path, Path]) -> None:
    _, tmp = roots
    d = tmp / f"coord-{UID}"
    d.mkdir()
    d.chmod(0o755)
    prepare_db_path(d / "coord.db", env={})
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700


def test_own_dir_not_created_when_create_false(roots: tuple[Path, Path]) -> None:
    _, tmp = roots
    with pytest.raises(UnsafePath, match="does not exist"):
        prepare_db_path(tmp / f"coord-{UID}" / "coord.db", create=False, env={})
    assert not (tmp / f"coord-{UID}").exists()


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_planted_at_default_dir(
    roots: tuple[Path, Path], tmp_path: Path, dangling: bool
) -> None:
    _, tmp = roots
    victim = tmp_path / "victim"
    if not dangling:
        victim.mkdir(mode=0o755)
        victim.chmod(0o755)
        (victim / "coord.db").write_bytes(b"precious")
        before = snapshot(victim / "coord.db")
    (tmp / f"coord-{UID}").symlink_to(victim)
    err = refused(tmp / f"coord-{UID}" / "coord.db", "symlink planted at")
    assert str(tmp / f"coord-{UID}") in str(err)
    if dangling:
        assert not victim.exists()
    else:
        assert stat.S_IMODE(os.lstat(victim).st_mode) == 0o755  # not chmod'ed through the link
        assert snapshot(victim / "coord.db") == before


def test_default_dir_squatted_by_another_user(roots: tuple[Path, Path]) -> None:
    _, tmp = roots
    d = tmp / f"coord-{UID}"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, -1)
    err = refused(d / "coord.db", f"owned by uid {NOBODY}")
    assert err.path == str(d)
    assert os.lstat(d).st_uid == NOBODY


def test_default_dir_that_is_a_file(roots: tuple[Path, Path]) -> None:
    _, tmp = roots
    (tmp / f"coord-{UID}").write_bytes(b"")
    refused(tmp / f"coord-{UID}" / "coord.db", "expected a directory")


# -- explicit directories ------------------------------------------------------------------


def test_explicit_dir_must_exist(tmp_path: Path) -> None:
    err = refused(tmp_path / "nope" / "coord.db", "does not exist")
    assert err.path == str(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_explicit_dir_not_chmodded(tmp_path: Path) -> None:
    d = tmp_path / "shared-read"
    d.mkdir()
    d.chmod(0o750)
    assert prepare_db_path(d / "coord.db", env={}) == d / "coord.db"
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o750


def test_explicit_dir_through_symlink_is_followed(private: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(private)
    assert prepare_db_path(tmp_path / "alias" / "coord.db", env={})


def test_existing_good_file_accepted(private: Path) -> None:
    db = private / "coord.db"
    db.write_bytes(b"SQLite format 3\0")
    db.chmod(0o600)
    before = snapshot(db)
    assert prepare_db_path(db, env={}) == db
    assert snapshot(db) == before


# -- refusals: each names the path and the reason, and touches nothing ------------------------


def test_dir_owned_by_nobody(private: Path) -> None:
    db = private / "coord.db"
    db.write_bytes(b"data")
    db.chmod(0o600)
    os.chown(private, NOBODY, -1)
    before = snapshot(db)
    err = refused(db, f"owned by uid {NOBODY}")
    assert err.path == str(private)
    assert snapshot(db) == before


def test_file_owned_by_nobody(private: Path) -> None:
    db = private / "coord.db"
    db.write_bytes(b"data")
    db.chmod(0o600)
    os.chown(db, NOBODY, -1)
    before = snapshot(db)
    err = refused(db, f"owned by uid {NOBODY}")
    assert err.path == str(db)
    assert snapshot(db) == before


@pytest.mark.parametrize("mode", [0o770, 0o730, 0o777, 0o1777, 0o702])
def test_dir_writable_by_group_or_others(private: Path, mode: int) -> None:
    db = private / "coord.db"
    db.write_bytes(b"data")
    db.chmod(0o600)
    private.chmod(mode)
    before = snapshot(db)
    err = refused(db, "writable by group or others")
    assert err.path == str(private)
    assert oct(mode) in str(err)
    assert snapshot(db) == before
    assert stat.S_IMODE(os.lstat(private).st_mode) == mode


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_file_writable_by_others(private: Path, mode: int) -> None:
    db = private / "coord.db"
    db.write_bytes(b"data")
    db.chmod(mode)
    before = snapshot(db)
    err = refused(db, "writable by group or others")
    assert err.path == str(db)
    assert snapshot(db) == before


def test_symlink_to_existing_file(private: Path, tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_bytes(b"root:x:0:0")
    target.chmod(0o644)
    db = private / "coord.db"
    db.symlink_to(target)
    before, before_target = snapshot(db), snapshot(target)
    err = refused(db, f"symlink planted at {db}")
    assert str(target) in str(err)
    assert snapshot(db) == before
    assert snapshot(target) == before_target


def test_dangling_symlink(private: Path, tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    db = private / "coord.db"
    db.symlink_to(target)
    before = snapshot(db)
    refused(db, f"symlink planted at {db}")
    assert snapshot(db) == before
    assert not target.exists()


def test_fifo_at_path(private: Path) -> None:
    db = private / "coord.db"
    os.mkfifo(db, 0o600)
    before = snapshot(db)
    err = refused(db, "a FIFO, not a regular file")
    assert err.path == str(db)
    assert snapshot(db) == before


def test_directory_at_path(private: Path) -> None:
    db = private / "coord.db"
    db.mkdir(mode=0o700)
    before = snapshot(db)
    refused(db, "a directory, not a regular file")
    assert snapshot(db) == before


def test_socket_at_path(private: Path) -> None:
    import socket

    db = private / "coord.db"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(db))
        refused(db, "a socket, not a regular file")


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    refused(tmp_path / "file" / "coord.db", "it is a regular file, not a directory")


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_companion_symlink(private: Path, tmp_path: Path, suffix: str) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"t")
    comp = private / f"coord.db{suffix}"
    comp.symlink_to(target)
    before = snapshot(target)
    err = refused(private / "coord.db", f"symlink planted at {comp}")
    assert err.path == str(comp)
    assert snapshot(target) == before


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_companion_owned_by_nobody(private: Path, suffix: str) -> None:
    comp = private / f"coord.db{suffix}"
    comp.write_bytes(b"w")
    comp.chmod(0o600)
    os.chown(comp, NOBODY, -1)
    before = snapshot(comp)
    err = refused(private / "coord.db", f"owned by uid {NOBODY}")
    assert err.path == str(comp)
    assert snapshot(comp) == before


def test_side_dir_symlink_and_foreign_owner(private: Path, tmp_path: Path) -> None:
    side = private / "coord.db.d"
    side.symlink_to(tmp_path)
    refused(private / "coord.db", f"symlink planted at {side}")
    side.unlink()
    side.mkdir(mode=0o700)
    os.chown(side, NOBODY, -1)
    err = refused(private / "coord.db", f"owned by uid {NOBODY}")
    assert err.path == str(side)


def test_network_fs_refused(private: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real NFS/FUSE mount is out of reach in a test; a mountinfo that says one covers the
    # directory exercises the same decision.
    fake = tmp_path / "mountinfo"
    fake.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"2 1 0:50 / {private} rw,relatime shared:7 - nfs4 srv:/export rw,vers=4.2\n"
    )
    monkeypatch.setattr(paths, "_MOUNTINFO", fake)
    db = private / "coord.db"
    db.write_bytes(b"data")
    db.chmod(0o600)
    before = snapshot(db)
    err = refused(db, "nfs4 filesystem")
    assert "WAL" in str(err) and str(db) in str(err)
    assert snapshot(db) == before


# -- filesystem type --------------------------------------------------------------------------

LOCAL_ROOT_TYPES = {"ext4", "ext3", "xfs", "btrfs", "overlay", "tmpfs", "zfs", "f2fs", "rootfs"}


def test_fs_type_of_real_mounts(tmp_path: Path) -> None:
    assert fs_type(Path("/")) in LOCAL_ROOT_TYPES
    assert fs_type(Path("/proc/self")) == "proc"
    assert fs_type(tmp_path / "not" / "yet") == fs_type(tmp_path)
    if os.path.ismount("/dev/shm"):
        assert fs_type(Path("/dev/shm")) == "tmpfs"
        assert fs_type(Path("/dev/shm/some-file")) == "tmpfs"


def test_fs_type_follows_symlinks_to_the_real_mount(tmp_path: Path) -> None:
    if not os.path.ismount("/dev/shm"):
        pytest.skip("/dev/shm is not a mount here")
    (tmp_path / "shm").symlink_to("/dev/shm")
    assert fs_type(tmp_path / "shm" / "x") == "tmpfs"


SYNTHETIC = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "60 27 0:50 / /mnt/home\\040share rw,nosuid,nodev shared:40 master:3"
    " - fuse.sshfs me@host:/home rw,user_id=0\n"
    "61 27 0:51 / /data rw,relatime - nfs4 nas:/vol/data rw,vers=4.2\n"
    "62 61 0:52 / /data/local rw - tmpfs tmpfs rw\n"
    "63 27 0:53 / /back\\134slash\\011tab rw - xfs /dev/vdb rw\n"
    "this line is garbage\n"
    "\n"
)


def test_parse_mountinfo_synthetic() -> None:
    assert parse_mountinfo(SYNTHETIC) == [
        ("/proc", "proc"),
        ("/", "ext4"),
        ("/mnt/home share", "fuse.sshfs"),
        ("/data", "nfs4"),
        ("/data/local", "tmpfs"),
        ("/back\\slash\ttab", "xfs"),
    ]


def test_mount_fs_type_longest_prefix() -> None:
    mounts = parse_mountinfo(SYNTHETIC)
    assert mount_fs_type(mounts, "/mnt/home share/me/coord.db") == "fuse.sshfs"
    assert mount_fs_type(mounts, "/mnt/home share") == "fuse.sshfs"
    assert mount_fs_type(mounts, "/mnt/home") == "ext4"  # a prefix of a name is not a parent
    assert mount_fs_type(mounts, "/data/q.db") == "nfs4"
    assert mount_fs_type(mounts, "/database/q.db") == "ext4"
    assert mount_fs_type(mounts, "/data/local/q.db") == "tmpfs"
    assert mount_fs_type(mounts, "/") == "ext4"
    assert mount_fs_type([], "/x") == "unknown"


def test_later_mount_on_same_point_wins() -> None:
    text = (
        "1 0 0:1 / / rw - ext4 a rw\n"
        "2 1 0:2 / /dev/shm rw - tmpfs b rw\n"
        "3 1 0:3 / /dev/shm rw - fuse.x c rw\n"
    )
    assert mount_fs_type(parse_mountinfo(text), "/dev/shm/f") == "fuse.x"


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("cifs", True),
        ("smb3", True),
        ("ceph", True),
        ("9p", True),
        ("fuse", True),
        ("fuse.sshfs", True),
        ("fuseblk", True),
        ("ext4", False),
        ("tmpfs", False),
        ("overlay", False),
        ("xfs", False),
    ],
)
def test_is_network_fs(fstype: str, network: bool) -> None:
    assert is_network_fs(fstype) is network


# -- private_dir and create_db_file ---------------------------------------------------------


def test_private_dir_created_0700(private: Path) -> None:
    db = private / "coord.db"
    old = os.umask(0o022)
    try:
        d = private_dir(db, "locks")
    finally:
        os.umask(old)
    assert d == private / "coord.db.d" / "locks"
    for p in (d, d.parent):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == UID
    assert private_dir(db, "locks") == d  # idempotent


def test_private_dir_refuses_symlinks(private: Path, tmp_path: Path) -> None:
    db = private / "coord.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (private / "coord.db.d").symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="symlink planted at"):
        private_dir(db, "locks")
    assert list(elsewhere.iterdir()) == []
    (private / "coord.db.d").unlink()
    (private / "coord.db.d").mkdir(mode=0o700)
    (private / "coord.db.d" / "locks").symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="symlink planted at"):
        private_dir(db, "locks")
    assert stat.S_IMODE(os.lstat(elsewhere).st_mode) == 0o755


def test_private_dir_refuses_foreign_owner(private: Path) -> None:
    side = private / "coord.db.d"
    side.mkdir(mode=0o700)
    os.chown(side, NOBODY, -1)
    with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
        private_dir(private / "coord.db", "locks")
    assert not (side / "locks").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../up"])
def test_private_dir_refuses_non_plain_names(private: Path, name: str) -> None:
    with pytest.raises(UnsafePath, match="not a plain directory name"):
        private_dir(private / "coord.db", name)


def test_create_db_file_is_0600_whatever_the_umask(private: Path) -> None:
    old = os.umask(0)
    try:
        create_db_file(private / "coord.db")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(private / "coord.db").st_mode) == 0o600


def test_create_db_file_leaves_existing_file_alone(private: Path) -> None:
    f = private / "coord.db"
    f.write_bytes(b"keep me")
    create_db_file(f)
    assert f.read_bytes() == b"keep me"


def test_create_db_file_does_not_follow_a_planted_symlink(private: Path, tmp_path: Path) -> None:
    link = private / "coord.db"
    link.symlink_to(tmp_path / "elsewhere")
    create_db_file(link)  # O_EXCL: the link exists, so nothing is created through it
    assert not (tmp_path / "elsewhere").exists()


def test_create_db_file_fsyncs_the_file_and_its_directory(private: Path) -> None:
    """Seen from outside by strace: the new file and then its directory are fsynced, so a
    power loss cannot keep the WAL of a persistent database and lose its file name."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    db = private / "coord.db"
    code = "import sys, pathlib, coord.paths; coord.paths.create_db_file(pathlib.Path(sys.argv[1]))"
    r = subprocess.run([strace, "-f", "-y", "-e", "trace=fsync,fdatasync", sys.executable, "-c",
                        code, str(db)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    synced = [line.split("<", 1)[1].split(">", 1)[0] for line in r.stderr.splitlines()
              if "fsync(" in line and "<" in line]
    assert synced == [str(db), str(private)]
    assert db.exists()
