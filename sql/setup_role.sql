-- Least-privilege role for the streamer. Run it as a superuser, connected to
-- the database to stream; running it again changes nothing.
--
-- Set a password separately, so it is never stored in this file:
--   ALTER ROLE cdc_stream PASSWORD '...';
--
-- The server must also allow the role in:
--   * postgresql.conf: wal_level = logical, and on builds that have the
--     output_plugin_libraries setting (Debian's PostgreSQL 15.20), a list
--     that includes wal2json, because such a server creates slots only for
--     the plugins listed there, for every role;
--   * pg_hba.conf: a line for this database and role. A logical replication
--     connection matches database lines, not the `replication` keyword.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_stream') THEN
        -- LOGIN to connect. REPLICATION to create the logical slot and to
        -- open the walsender connection that streams it. No SUPERUSER,
        -- CREATEDB or CREATEROLE.
        CREATE ROLE cdc_stream LOGIN REPLICATION;
    END IF;
END
$$;

-- Restores the two attributes if someone removed them from an existing role.
ALTER ROLE cdc_stream LOGIN REPLICATION;

-- CONNECT is granted to PUBLIC by default, but hardened databases revoke it;
-- the streamer's connections, replication included, need it.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO cdc_stream', current_database());
END
$$;

-- USAGE lets the role look up objects in the schema of the streamed tables.
GRANT USAGE ON SCHEMA public TO cdc_stream;

-- Logical decoding reads no table privilege: the walsender decodes the WAL
-- through the catalogs. SELECT is the only table privilege granted, so the
-- streamer can read the current rows of the tables it streams, and it can
-- never change them (no INSERT, UPDATE, DELETE or TRUNCATE). It covers the
-- tables that exist now in schema public; repeat it for other schemas, or
-- name single tables instead, to narrow it.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO cdc_stream;
