-- Every {locations,diagnostics,vehicle_events,trips}_YYYYMMDD table of the schema ($1), attached or not:
-- its name, its parent, and whether a DETACH ... CONCURRENTLY of it is pending.
SELECT c.relname::text, p.relname::text, coalesce(i.inhdetachpending, false)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
  LEFT JOIN pg_class p ON p.oid = i.inhparent
 WHERE n.nspname = $1 AND c.relkind = 'r'
   AND c.relname ~ '^(locations|diagnostics|vehicle_events|trips)_[0-9]{8}$'
