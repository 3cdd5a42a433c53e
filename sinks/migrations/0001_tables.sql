-- 0001: the contract's tables (CONTRACT.md §5).
--
-- `{schema}` is replaced by the sink's (validated, quoted) schema name. Applied once, inside a
-- transaction holding the sink's advisory lock, and recorded in {schema}.fleetpipe_migrations;
-- `IF NOT EXISTS` keeps it harmless on a database where the tables were made by hand.
--
-- Both tables are partitioned by event time, one partition per UTC day, named
-- `locations_YYYYMMDD`; the sink creates them (ahead of time, and before writing any other day a
-- frame belongs to) and drops them only after a configured retention. There is deliberately no
-- DEFAULT partition: rows in it would make a later `CREATE TABLE … PARTITION OF` for their day fail.
--
-- The unique index on (vehicle_id, ts, seq) makes replays idempotent (it contains the partition
-- key `ts`, as a unique index of a partitioned table must). It also serves the per-vehicle
-- queries: a forward range scan for a track (`vehicle_id = $1 AND ts BETWEEN … ORDER BY ts`) and
-- a backward scan for the latest (`vehicle_id = $1 ORDER BY ts DESC LIMIT 1`), so there is no
-- second (vehicle_id, ts DESC) index to maintain on every insert.

CREATE TABLE IF NOT EXISTS {schema}.locations (
    vehicle_id  text             NOT NULL,
    ts          timestamptz      NOT NULL,
    seq         bigint           NOT NULL,
    received_at timestamptz      NOT NULL,
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    speed_kmh   double precision,
    heading_deg double precision,
    alt_m       double precision,
    accuracy_m  double precision,
    satellites  integer,
    odometer_m  double precision,
    ignition    boolean
) PARTITION BY RANGE (ts);

CREATE UNIQUE INDEX IF NOT EXISTS locations_identity ON {schema}.locations (vehicle_id, ts, seq);

CREATE TABLE IF NOT EXISTS {schema}.diagnostics (
    vehicle_id      text             NOT NULL,
    ts              timestamptz      NOT NULL,
    seq             bigint           NOT NULL,
    received_at     timestamptz      NOT NULL,
    engine_rpm      double precision,
    coolant_temp_c  double precision,
    engine_load_pct double precision,
    fuel_level_pct  double precision,
    battery_soc_pct double precision,
    battery_v       double precision,
    engine_hours    double precision,
    odometer_m      double precision,
    mil_on          boolean,
    -- The contract's JSON form: OBD-II/UDS code strings and {"spn","fmi","oc","sa"} objects.
    dtcs            jsonb,
    -- An object of VSS path -> number | bool | string.
    signals         jsonb
) PARTITION BY RANGE (ts);

CREATE UNIQUE INDEX IF NOT EXISTS diagnostics_identity ON {schema}.diagnostics (vehicle_id, ts, seq);

-- How far each sink got in fleetpipe's write-ahead log, moved in the transaction that wrote the
-- rows, so the log replays exactly what Postgres lacks.
CREATE TABLE IF NOT EXISTS {schema}.fleetpipe_checkpoints (
    sink text   PRIMARY KEY,
    lsn  bigint NOT NULL
);
