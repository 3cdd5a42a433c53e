-- Moves a sink's checkpoint forward, in the transaction that stores its batch.
INSERT INTO {schema}.fleetpipe_checkpoints AS c (sink, lsn) VALUES ($1, $2)
  ON CONFLICT (sink) DO UPDATE SET lsn = greatest(c.lsn, excluded.lsn)
