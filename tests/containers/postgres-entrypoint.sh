#!/bin/sh
# The official image's first start, reduced to what the tests use: a cluster in PGDATA owned
# by POSTGRES_USER with POSTGRES_PASSWORD (scram), the database POSTGRES_DB, password logins
# from the network; then the command, exec'd so that it gets the signals.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$password_file" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --no-instructions
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.auto.conf"
    postgres --single -D "$PGDATA" -c listen_addresses='' postgres <<SQL
CREATE DATABASE "$POSTGRES_DB" OWNER "$POSTGRES_USER";
SQL
fi
exec "$@"
