# Sourced by .ci/run: a private PostgreSQL cluster for the test run, always stopped at exit.
# initdb refuses root, so tests/pgcluster.py runs the server as the `postgres` user in a
# temporary directory (unix socket + a loopback port) and prints the URLs the suite reads.
# The multi-host tests (tests/multihost) also need iproute2's `ip` and `tc`; the pooler tests
# (tests/pg/test_pg_pooler.py) run Debian's pgbouncer with a configuration of their own.
pg_cluster="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/pgcluster.py"
pg_missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v pg_config >/dev/null ||
    pg_missing+=(postgresql)
command -v ip >/dev/null && command -v tc >/dev/null || pg_missing+=(iproute2)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || pg_missing+=(pgbouncer)
if [ ${#pg_missing[@]} -gt 0 ]; then
    if [[ " ${pg_missing[*]} " == *" postgresql "* ]]; then
        # Debian's package would also create and start a system-wide "main" cluster.
        mkdir -p /etc/postgresql-common/createcluster.d
        echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/coord-ci.conf
    fi
    # Nor may the package start a system-wide pgbouncer: no service starts during the install.
    pg_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        pg_policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$pg_policy" && chmod +x "$pg_policy"
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pg_missing[@]}"
    [ -z "$pg_policy" ] || rm -f "$pg_policy"
fi
COORD_PG_DIR=$(mktemp -d /tmp/coord-ci-pg.XXXXXX)
trap 'python3 "$pg_cluster" stop "$COORD_PG_DIR"' EXIT
pg_env=$(python3 "$pg_cluster" start "$COORD_PG_DIR")
eval "$pg_env"
