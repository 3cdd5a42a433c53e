SELECT lsn FROM {schema}.fleetpipe_checkpoints WHERE sink = $1
