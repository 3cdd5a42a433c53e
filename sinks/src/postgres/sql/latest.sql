-- A vehicle's newest row of a kind (by ts, then seq): the last tier of the latest-state read.
-- A row whose ts was more than $2 seconds ahead of the clock that received it never is.
SELECT {select} FROM {schema}.{table}
WHERE vehicle_id = $1 AND ts <= received_at + make_interval(secs => $2)
ORDER BY ts DESC, seq DESC LIMIT 1
