-- The versions of sinks/migrations applied to the schema.
CREATE TABLE IF NOT EXISTS {schema}.fleetpipe_migrations (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
