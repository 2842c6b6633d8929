# Sourced by .ci/run: a private PostgreSQL cluster for the test run, always stopped at exit.
# initdb refuses root, so tests/pgcluster.py runs the server as the `postgres` user in a
# temporary directory (unix socket + a loopback port) and prints the URLs the suite reads.
# The multi-host tests (tests/multihost) also need iproute2's `ip` and `tc`.
pg_cluster="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/pgcluster.py"
pg_missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v pg_config >/dev/null ||
    pg_missing+=(postgresql)
command -v ip >/dev/null && command -v tc >/dev/null || pg_missing+=(iproute2)
if [ ${#pg_missing[@]} -gt 0 ]; then
    if [[ " ${pg_missing[*]} " == *" postgresql "* ]]; then
        # Debian's package would also create and start a system-wide "main" cluster.
        mkdir -p /etc/postgresql-common/createcluster.d
        echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/coord-ci.conf
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pg_missing[@]}"
fi
COORD_PG_DIR=$(mktemp -d /tmp/coord-ci-pg.XXXXXX)
trap 'python3 "$pg_cluster" stop "$COORD_PG_DIR"' EXIT
pg_env=$(python3 "$pg_cluster" start "$COORD_PG_DIR")
eval "$pg_env"
