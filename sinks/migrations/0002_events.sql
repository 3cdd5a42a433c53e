-- 0002: vehicle events and trips (CONTRACT.md §9), written by the Postgres events sink.
--
-- Day-partitioned like the history: `vehicle_events` by the event's `ts`, `trips` by the trip's
-- `start_ts`. Event and trip ids are functions of the frames, so a replay writes the same rows:
-- the unique indexes (which contain the partition key, as they must) make it a no-op. The
-- engine's state and how far in the log it got are kept in `fleetpipe_event_state`, moved in
-- the transaction that wrote the rows.

CREATE TABLE IF NOT EXISTS {schema}.vehicle_events (
    event_id    text        NOT NULL,
    vehicle_id  text        NOT NULL,
    type        text        NOT NULL,
    ts          timestamptz NOT NULL,
    detected_at timestamptz NOT NULL,
    trip_id     text,
    -- The event as the contract's JSON.
    body        jsonb       NOT NULL
) PARTITION BY RANGE (ts);

CREATE UNIQUE INDEX IF NOT EXISTS vehicle_events_identity ON {schema}.vehicle_events (event_id, ts);
CREATE INDEX IF NOT EXISTS vehicle_events_vehicle ON {schema}.vehicle_events (vehicle_id, ts);

CREATE TABLE IF NOT EXISTS {schema}.trips (
    trip_id          text             NOT NULL,
    vehicle_id       text             NOT NULL,
    start_ts         timestamptz      NOT NULL,
    end_ts           timestamptz      NOT NULL,
    start_lat        double precision NOT NULL,
    start_lon        double precision NOT NULL,
    end_lat          double precision NOT NULL,
    end_lon          double precision NOT NULL,
    distance_m       double precision NOT NULL,
    duration_s       double precision NOT NULL,
    moving_s         double precision NOT NULL,
    max_speed_kmh    double precision,
    avg_speed_kmh    double precision,
    odometer_start_m double precision,
    odometer_end_m   double precision,
    fuel_used_pct    double precision,
    energy_used_pct  double precision,
    dtcs             jsonb            NOT NULL,
    -- The summary as the contract's JSON.
    body             jsonb            NOT NULL
) PARTITION BY RANGE (start_ts);

CREATE UNIQUE INDEX IF NOT EXISTS trips_identity ON {schema}.trips (trip_id, start_ts);
CREATE INDEX IF NOT EXISTS trips_vehicle ON {schema}.trips (vehicle_id, start_ts);

CREATE TABLE IF NOT EXISTS {schema}.fleetpipe_event_state (
    sink  text   PRIMARY KEY,
    lsn   bigint NOT NULL,
    state bytea  NOT NULL
);
