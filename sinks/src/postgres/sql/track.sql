-- A vehicle's location history in time order, from <= ts < to (epoch microseconds), at most a limit.
SELECT {select} FROM {schema}.locations WHERE vehicle_id = $1
  AND ts >= to_timestamp($2::float8 / 1e6) AND ts < to_timestamp($3::float8 / 1e6)
  ORDER BY ts, seq LIMIT $4
