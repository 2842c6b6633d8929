"""Where the database lives, and the checks that make it safe to open.

Precedence of the database path (``resolve_db_path``)::

    --db PATH
    > $COORD_DB
    > $XDG_RUNTIME_DIR/coord/coord.db
    > /run/user/<uid>/coord/coord.db   when /run/user/<uid> exists, is ours and is 0700
    > /tmp/coord-<uid>/coord.db

The ``/run/user`` step is what lets a cron job (which has no ``XDG_RUNTIME_DIR``) find the same
database as the user's login session. platformdirs is deliberately not used: its runtime-dir
fallback differs between cron and a shell.

``prepare_db_path`` then refuses, with ``UnsafePath``, anything another user could have
arranged: a directory or file owned by someone else or writable by group/others, a symlink
planted at the database path or at coord's own directory, something that is not a regular file,
and network or FUSE filesystems (WAL needs shared memory, which they do not provide). This is
the same stance tmux and ssh-agent take for their sockets.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import UnsafePath

__all__ = [
    "NETWORK_FS_TYPES",
    "default_db_path",
    "fs_type",
    "is_network_fs",
    "mount_fs_type",
    "parse_mountinfo",
    "prepare_db_path",
    "private_dir",
    "resolve_db_path",
    "create_db_file",
]

DB_NAME = "coord.db"
DIR_NAME = "coord"

# Module-level so tests can point them at a fake root; nothing else should change them.
_RUN_USER = Path("/run/user")
_TMP = Path("/tmp")
_MOUNTINFO = Path("/proc/self/mountinfo")

NETWORK_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "9p",
        "sshfs",
    }
)

# Files SQLite keeps beside the database; an attacker who controls one controls the data.
_COMPANION_SUFFIXES = ("-wal", "-shm", "-journal")
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


# -- where ---------------------------------------------------------------------------------


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _xdg_runtime_dir(env: Mapping[str, str]) -> Path | None:
    value = env.get("XDG_RUNTIME_DIR", "")
    # The XDG spec says a relative value must be ignored.
    return Path(value) if value and os.path.isabs(value) else None


def _run_user_dir_is_valid(uid: int) -> Path | None:
    candidate = _RUN_USER / str(uid)
    try:
        st = os.lstat(candidate)
    except OSError:
        return None
    # Mirror what systemd-logind guarantees; anything else might be someone else's squat.
    if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o700:
        return candidate
    return None


def _own_dirs(env: Mapping[str, str]) -> set[Path]:
    """coord's own default directories: the only ones it creates and chmods."""
    uid = os.geteuid()
    dirs = {_RUN_USER / str(uid) / DIR_NAME, _TMP / f"coord-{uid}"}
    xdg = _xdg_runtime_dir(env)
    if xdg is not None:
        dirs.add(xdg / DIR_NAME)
    return dirs


def default_db_path(env: Mapping[str, str] | None = None) -> Path:
    """The database path when no ``--db`` is given.

    ``COORD_DB`` > ``$XDG_RUNTIME_DIR/coord/coord.db`` > ``/run/user/<uid>/coord/coord.db``
    (only when that runtime directory exists, is owned by the user and is mode 0700) >
    ``/tmp/coord-<uid>/coord.db``. ``env`` defaults to ``os.environ``. Nothing is created.
    """
    env = _environ(env)
    explicit = env.get("COORD_DB", "")
    if explicit:
        return Path(os.path.expanduser(explicit))
    xdg = _xdg_runtime_dir(env)
    if xdg is not None:
        return xdg / DIR_NAME / DB_NAME
    uid = os.geteuid()
    run_user = _run_user_dir_is_valid(uid)
    if run_user is not None:
        return run_user / DIR_NAME / DB_NAME
    return _TMP / f"coord-{uid}" / DB_NAME


def resolve_db_path(
    explicit: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Path:
    """The absolute database path: ``explicit`` (the ``--db`` flag) if given, else the default.

    Symlinks are not resolved, so ``prepare_db_path`` sees (and can refuse) a planted one.
    """
    if explicit is not None and os.fspath(explicit) != "":
        path = Path(os.path.expanduser(os.fspath(explicit)))
    else:
        path = default_db_path(env)
    # Path.absolute() neither resolves symlinks nor collapses "..": what we check is exactly
    # what SQLite will open.
    return path.absolute()


# -- filesystem type -------------------------------------------------------------------------

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash in mountinfo as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) for each line of ``/proc/<pid>/mountinfo`` text, in order.

    Malformed lines are skipped.
    """
    mounts: list[tuple[str, str]] = []
    for line in text.splitlines():
        fields = line.split(" ")
        # Optional fields (shared:N, master:N ...) vary in number; a lone "-" ends them.
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) <= sep + 1:
            continue
        mounts.append((_unescape(fields[4]), fields[sep + 1]))
    return mounts


def mount_fs_type(mounts: list[tuple[str, str]], realpath: str) -> str:
    """The type of the mount holding ``realpath``: the longest matching mount point wins.

    On equal length the later entry wins, because a later mount on the same point hides the
    earlier one. Returns ``"unknown"`` when nothing matches.
    """
    best, best_len = "unknown", -1
    for mount_point, fstype in mounts:
        mp = mount_point.rstrip("/") or "/"
        inside = mp == "/" or realpath == mp or realpath.startswith(mp + "/")
        if inside and len(mp) >= best_len:
            best, best_len = fstype, len(mp)
    return best


def fs_type(path: Path) -> str:
    """Filesystem type (``ext4``, ``tmpfs``, ``nfs4``, ``fuse.sshfs`` ...) of the mount holding path.

    Read from ``/proc/self/mountinfo`` because ``statvfs`` does not report it. ``path`` need not
    exist. Returns ``"unknown"`` where mountinfo cannot be read (not Linux).
    """
    try:
        raw = _MOUNTINFO.read_bytes()
    except OSError:
        return "unknown"
    # Mount points are bytes; surrogateescape keeps non-UTF-8 names comparable to realpath().
    return mount_fs_type(parse_mountinfo(os.fsdecode(raw)), os.path.realpath(path))


def is_network_fs(fstype: str) -> bool:
    """True for network and FUSE filesystems, where SQLite's WAL shared memory is unreliable."""
    return fstype in NETWORK_FS_TYPES or fstype.startswith("fuse")


# -- checks ----------------------------------------------------------------------------------


def _mode(st: os.stat_result) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    if stat.S_ISDIR(m):
        return "a directory"
    if stat.S_ISFIFO(m):
        return "a FIFO"
    if stat.S_ISSOCK(m):
        return "a socket"
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return "a device"
    if stat.S_ISLNK(m):
        return "a symlink"
    if stat.S_ISREG(m):
        return "a regular file"
    return "an unknown kind of file"


def _check_owner_and_mode(path: Path | str, st: os.stat_result, what: str) -> None:
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafePath(path, f"{what} is owned by uid {st.st_uid}, not by you (uid {euid})")
    if st.st_mode & _WRITABLE_BY_OTHERS:
        raise UnsafePath(
            path,
            f"{what} is writable by group or others (mode {_mode(st)}); "
            "it must be private (0700 for a directory, 0600 for a file)",
        )


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UnsafePath(path, f"cannot inspect it: {e.strerror}") from e


def _symlink_reason(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"symlink planted at {path} (-> {target}); coord never follows one here"


def _check_file(path: Path, what: str) -> None:
    st = _lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(path, _symlink_reason(path))
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(path, f"{what} is {_kind(st)}, not a regular file")
    _check_owner_and_mode(path, st, what)


def _ensure_private_subdir(parent_fd: int, name: str, display: Path, create: bool) -> int:
    """Make ``name`` under ``parent_fd`` a 0700 directory owned by us; return an fd for it.

    Working relative to the parent's fd means a rename of the parent cannot redirect us, and
    O_NOFOLLOW means a symlink swapped in after the lstat is still refused.
    """
    try:
        st: os.stat_result | None = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UnsafePath(display, f"cannot inspect it: {e.strerror}") from e
    if st is None:
        if not create:
            raise UnsafePath(display, "directory does not exist")
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass  # someone raced us; the checks below decide whether to trust it
        except OSError as e:
            raise UnsafePath(display, f"cannot create directory: {e.strerror}") from e
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(display, _symlink_reason(display))
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(display, f"expected a directory, found {_kind(st)}")
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
    except OSError as e:
        raise UnsafePath(display, f"cannot open directory: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        _check_owner_and_mode(display, st, "directory")
        # The umask may have taken bits away (0500 is useless to us), and a pre-existing dir
        # of ours may be readable by others: set exactly 0700 on the inode we just verified.
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise UnsafePath(path, "directory does not exist") from e
    except NotADirectoryError as e:
        raise UnsafePath(path, "not a directory") from e
    except OSError as e:
        raise UnsafePath(path, f"cannot open directory: {e.strerror}") from e


def _ensure_own_dir(directory: Path, create: bool) -> None:
    parent_fd = _open_dir(directory.parent)
    try:
        os.close(_ensure_private_subdir(parent_fd, directory.name, directory, create))
    finally:
        os.close(parent_fd)


def _check_explicit_dir(directory: Path) -> None:
    # A directory the user chose may legitimately be reached through a symlink (~/data ->
    # /mnt/data), so follow it; but it must exist: coord only creates its own directories.
    try:
        st = os.stat(directory)
    except FileNotFoundError as e:
        raise UnsafePath(
            directory,
            "directory does not exist; create it (mode 0700) or choose another --db/COORD_DB",
        ) from e
    except OSError as e:
        raise UnsafePath(directory, f"cannot inspect it: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(directory, f"it is {_kind(st)}, not a directory")
    _check_owner_and_mode(directory, st, "the database's directory")


def _check_companion_dir(path: Path) -> None:
    st = _lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(path, _symlink_reason(path))
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(path, f"expected a directory, found {_kind(st)}")
    _check_owner_and_mode(path, st, "directory")


def prepare_db_path(
    path: Path, *, create: bool = True, env: Mapping[str, str] | None = None
) -> Path:
    """Make the database's directory ready and refuse anything unsafe; return the path.

    coord's own default directories (``<runtime dir>/coord``, ``/tmp/coord-<uid>``) are
    created 0700 when ``create`` is true (and must not be symlinks). Any other directory must
    already exist and is left as it is. Raises ``UnsafePath`` when the directory, the database
    file, its ``-wal``/``-shm`` companions or ``<db>.d`` is owned by another user, writable by
    group/others, a planted symlink or the wrong kind of file, or when the directory is on a
    network or FUSE filesystem. Nothing at the database path is ever modified.
    ``env`` (default ``os.environ``) decides which runtime directory counts as coord's own.
    """
    path = Path(path).absolute()
    directory = path.parent
    if directory in _own_dirs(_environ(env)):
        _ensure_own_dir(directory, create)
    else:
        _check_explicit_dir(directory)

    fstype = fs_type(directory)
    if is_network_fs(fstype):
        raise UnsafePath(
            path,
            f"it is on a {fstype} filesystem; SQLite's WAL needs shared memory, which network "
            "and FUSE filesystems do not provide reliably; use a local disk",
        )

    _check_file(path, "the database file")
    for suffix in _COMPANION_SUFFIXES:
        _check_file(Path(f"{path}{suffix}"), f"the database's {suffix} file")
    _check_companion_dir(Path(f"{path}.d"))
    return path


def private_dir(db_path: Path, name: str) -> Path:
    """Create (if needed) and return ``<db_path>.d/<name>``, a 0700 directory owned by us.

    The place for lock files, sockets and logs beside the database; ``<db_path>.d`` is made
    0700 too. Symlinks are never followed.
    """
    if not name or "/" in name or name in (".", ".."):
        raise UnsafePath(name, "not a plain directory name")
    db_path = Path(db_path).absolute()
    side = Path(f"{db_path}.d")
    parent_fd = _open_dir(db_path.parent)
    try:
        side_fd = _ensure_private_subdir(parent_fd, side.name, side, create=True)
    finally:
        os.close(parent_fd)
    try:
        os.close(_ensure_private_subdir(side_fd, name, side / name, create=True))
    finally:
        os.close(side_fd)
    return side / name


def create_db_file(path: Path) -> None:
    """Create an empty database file with mode 0600 if none exists; SQLite then gives its
    ``-wal`` and ``-shm`` the same mode.

    Existing files are never opened here: closing any descriptor of a file in a process
    drops every POSIX lock that process holds on it, including SQLite's own, and a lost
    ``-shm`` lock lets another process reset the shared memory under us (SIGBUS). A new file
    created with O_EXCL cannot be open anywhere in this process yet.

    The new file and its directory entry are fsynced: on a persistent ``COORD_DB`` a power
    loss must not leave a database whose WAL survived but whose file name did not (SQLite
    itself syncs the directory when it creates the ``-wal``).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
