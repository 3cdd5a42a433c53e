-- Moves the staged rows into the table, keeping the rows already there.
WITH moved AS (DELETE FROM pg_temp.fleetpipe_stage_{table} RETURNING *)
  INSERT INTO {schema}.{table} ({columns}) SELECT {columns} FROM moved ON CONFLICT DO NOTHING
