-- The staging table of a redo (a batch that met rows already stored, or a refused row).
CREATE TEMP TABLE IF NOT EXISTS fleetpipe_stage_{table} (LIKE {schema}.{table}) ON COMMIT DROP
