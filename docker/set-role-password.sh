#!/bin/sh
# Runs once, when the PostgreSQL container initialises its data directory,
# after setup_role.sql: gives the streaming role the password from
# CDC_DB_PASSWORD. psql interpolates :'password' as a quoted literal, so the
# password needs no escaping.
set -eu
echo "ALTER ROLE cdc_stream PASSWORD :'password';" \
    | psql -v ON_ERROR_STOP=1 -v password="$CDC_DB_PASSWORD" \
        --username "$POSTGRES_USER" --dbname "$POSTGRES_DB"
