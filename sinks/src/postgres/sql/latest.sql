-- A vehicle's newest row of a kind (by ts, then seq): the last tier of the latest-state read.
SELECT {select} FROM {schema}.{table} WHERE vehicle_id = $1 ORDER BY ts DESC, seq DESC LIMIT 1
