# shellcheck shell=bash
# A throwaway PostgreSQL for the tests, sourced by .ci/run (or by hand, see below).
#
# Debian's postgresql (installed if missing), a cluster in a temp dir on 127.0.0.1 at a
# free port, stopped and deleted when the sourcing shell exits. It exports
#   STUDY_TEST_POSTGRES_URL         the superuser "study", no password (trust), db study_test
#   STUDY_TEST_POSTGRES_SECRET_URL  role "study_secret" with a random password that the
#                                   server checks (scram-sha-256), db study_secret
# By hand, for a server that outlives the shell: STUDY_PG_KEEP=1 . .ci/postgres.sh
pg_ctl_path() {
    ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1
}
if [ -z "$(pg_ctl_path)" ] && ! command -v pg_ctl >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_CTL=$(pg_ctl_path)
PG_CTL=${PG_CTL:-$(command -v pg_ctl)}
PG_BIN=$(dirname "$(readlink -f "$PG_CTL")")
PG_DIR=$(mktemp -d /tmp/study-pg.XXXXXX)
PG_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PG_SECRET=$(python3 -c 'import secrets; print("Sx-" + secrets.token_hex(12))')
pg_as_owner() {
    # initdb and postgres refuse to run as root: run them as the postgres user then.
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$PG_DIR"
fi
pg_as_owner "$PG_BIN/initdb" -D "$PG_DIR/data" -U study -A trust --no-sync >/dev/null
# The superuser connects without a password; every other role must give its own.
cat > "$PG_DIR/pg_hba.conf" <<HBA
local all all trust
host all study 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
HBA
if [ "$(id -u)" = 0 ]; then chown postgres "$PG_DIR/pg_hba.conf"; fi
pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
    -o "-h 127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off -c hba_file=$PG_DIR/pg_hba.conf" \
    start >/dev/null
if [ -z "${STUDY_PG_KEEP:-}" ]; then
    trap 'pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$PG_DIR"' EXIT
fi
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U study study_test
"$PG_BIN/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U study -d study_test \
    -c "CREATE ROLE study_secret LOGIN PASSWORD '$PG_SECRET'"
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U study -O study_secret study_secret
export STUDY_TEST_POSTGRES_URL="postgresql://study@127.0.0.1:$PG_PORT/study_test"
export STUDY_TEST_POSTGRES_SECRET_URL="postgresql://study_secret:$PG_SECRET@127.0.0.1:$PG_PORT/study_secret"
if [ -n "${STUDY_PG_KEEP:-}" ]; then
    echo "export STUDY_TEST_POSTGRES_URL=$STUDY_TEST_POSTGRES_URL"
    echo "export STUDY_TEST_POSTGRES_SECRET_URL=$STUDY_TEST_POSTGRES_SECRET_URL"
fi
