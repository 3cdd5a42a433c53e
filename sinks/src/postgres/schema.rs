//! The sink's tables: migrations, day partitions, and what a Postgres error means for a batch.
//!
//! Migrations are the `.sql` files of `sinks/migrations`, numbered, compiled in. They run at open
//! in one transaction that holds an advisory lock per schema, so two instances starting at once
//! take turns and the second finds nothing to do. Partitions are created under the same lock.

use std::collections::HashSet;

use tokio_postgres::Client;

use fleetpipe_processors::time::{compact_date, date_string, days_from_civil, parse_compact_date};

/// `(version, sql)`, in order. `{schema}` in the text is replaced by the quoted schema name.
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_tables.sql")),
    (2, include_str!("../../migrations/0002_events.sql")),
];

const MIGRATIONS_TABLE_SQL: &str = include_str!("sql/migrations_table.sql");
const CREATE_PARTITION_SQL: &str = include_str!("sql/create_partition.sql");
const DAY_TABLES_SQL: &str = include_str!("sql/day_tables.sql");

/// Advisory lock class of fleetpipe's schema changes (`"flpp"` in ASCII); the object id is
/// `hashtext(schema)`, so instances writing different schemas do not wait for each other.
const LOCK_CLASS: i32 = 0x666c_7070;

/// The partitioned tables, one partition per UTC day each.
pub(crate) const TABLES: [&str; 4] = ["locations", "diagnostics", "vehicle_events", "trips"];

/// Most partitions created in one transaction: each takes locks that count against
/// `max_locks_per_transaction`, and a backfill over years needs thousands.
const PARTITION_DAYS_PER_TRANSACTION: usize = 32;

/// Checks that `name` is a plain lower-case identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes),
/// so that it can be put into SQL text.
pub fn validate_schema_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b == b'_' || b.is_ascii_lowercase());
    let rest_ok = bytes.all(|b| b == b'_' || b.is_ascii_lowercase() || b.is_ascii_digit());
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(format!(
            "schema name {name:?} is not an identifier of the form [a-z_][a-z0-9_]* (at most 63 bytes)"
        ))
    }
}

/// A validated identifier, quoted (so that reserved words such as `user` work too).
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{ident}\"")
}

/// Applies the migrations `schema` lacks; returns the versions applied.
pub(crate) async fn migrate(client: &mut Client, schema: &str) -> Result<Vec<i32>, tokio_postgres::Error> {
    let q = quote(schema);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&LOCK_CLASS, &schema]).await?;
    // Checked first because CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when the
    // schema exists.
    let exists = tx.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema]).await?.is_some();
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {q}")).await?;
    }
    tx.batch_execute(&MIGRATIONS_TABLE_SQL.replace("{schema}", &q)).await?;
    let done: HashSet<i32> = tx
        .query(&format!("SELECT version FROM {q}.fleetpipe_migrations"), &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(&sql.replace("{schema}", &q)).await?;
        tx.execute(&format!("INSERT INTO {q}.fleetpipe_migrations (version) VALUES ($1)"), &[version])
            .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// Days a partition can be made for: years 1..=9999 (what validation lets through, and what
/// an 8-digit `YYYYMMDD` suffix and a plain date literal can express). A frame outside them is
/// refused by Postgres (no partition) and diverted as a poison row.
pub(crate) fn partitionable(day: i64) -> bool {
    (days_from_civil(1, 1, 1)..=days_from_civil(9999, 12, 31)).contains(&day)
}

/// `YYYYMMDD` of a day.
pub(crate) fn day_suffix(day: i64) -> String {
    compact_date(day)
}

/// The day of a `YYYYMMDD` suffix.
pub(crate) fn parse_day_suffix(s: &str) -> Option<i64> {
    parse_compact_date(s)
}

/// `YYYY-MM-DD 00:00:00+00`, the start of a day as a timestamptz literal.
fn day_start(day: i64) -> String {
    format!("{} 00:00:00+00", date_string(day))
}

/// Creates the partitions of every table for `days` (each must be [`partitionable`]), a few
/// dozen days per transaction, under the schema's advisory lock.
pub(crate) async fn create_partitions(
    client: &mut Client,
    schema: &str,
    days: &[i64],
) -> Result<(), tokio_postgres::Error> {
    let q = quote(schema);
    for chunk in days.chunks(PARTITION_DAYS_PER_TRANSACTION) {
        let mut sql = String::new();
        for &day in chunk {
            let (from, to, suffix) = (day_start(day), day_start(day + 1), day_suffix(day));
            for table in TABLES {
                sql.push_str(
                    &CREATE_PARTITION_SQL
                        .replace("{schema}", &q)
                        .replace("{table}", table)
                        .replace("{suffix}", &suffix)
                        .replace("{from}", &from)
                        .replace("{to}", &to),
                );
            }
        }
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&LOCK_CLASS, &schema]).await?;
        tx.batch_execute(&sql).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// A day table found in the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DayTable {
    pub(crate) table: &'static str,
    pub(crate) day: i64,
    /// A partition of its table (and not half-way through a detach).
    pub(crate) attached: bool,
    /// Half-way through `DETACH PARTITION … CONCURRENTLY` (an interrupted retention drop).
    pub(crate) detach_pending: bool,
}

impl DayTable {
    pub(crate) fn name(&self) -> String {
        format!("{}_{}", self.table, day_suffix(self.day))
    }
}

/// Every `locations_YYYYMMDD` / `diagnostics_YYYYMMDD` table of the schema, attached or not.
pub(crate) async fn day_tables(
    client: &Client,
    schema: &str,
) -> Result<Vec<DayTable>, tokio_postgres::Error> {
    let rows = client.query(DAY_TABLES_SQL, &[&schema]).await?;
    let mut out = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let parent: Option<String> = row.get(1);
        let detach_pending: bool = row.get(2);
        let Some((table, suffix)) = name.rsplit_once('_') else { continue };
        let Some(table) = TABLES.iter().copied().find(|t| *t == table) else { continue };
        let Some(day) = parse_day_suffix(suffix) else { continue };
        let attached = parent.as_deref() == Some(table) && !detach_pending;
        out.push(DayTable { table, day, attached, detach_pending });
    }
    Ok(out)
}

/// Days for which every table has an attached partition.
pub(crate) fn complete_days(tables: &[DayTable]) -> HashSet<i64> {
    let mut seen: HashSet<(&str, i64)> = HashSet::new();
    for t in tables.iter().filter(|t| t.attached) {
        seen.insert((t.table, t.day));
    }
    seen.iter()
        .filter(|(table, day)| *table == TABLES[0] && TABLES.iter().all(|t| seen.contains(&(*t, *day))))
        .map(|(_, d)| *d)
        .collect()
}

/// Drops the day tables older than `cutoff` (a day number): detached first with
/// `DETACH PARTITION … CONCURRENTLY`, which takes only a SHARE UPDATE EXCLUSIVE lock on the parent
/// (a plain `DROP TABLE` of a partition would lock the parent against every writer and reader
/// while it waits). Returns the days dropped.
pub(crate) async fn drop_before(
    client: &Client,
    schema: &str,
    cutoff: i64,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let q = quote(schema);
    let mut dropped = Vec::new();
    for t in day_tables(client, schema).await? {
        if t.day >= cutoff {
            continue;
        }
        let name = t.name();
        if t.detach_pending {
            client
                .batch_execute(&format!("ALTER TABLE {q}.{} DETACH PARTITION {q}.{name} FINALIZE", t.table))
                .await?;
        } else if t.attached {
            client
                .batch_execute(&format!(
                    "ALTER TABLE {q}.{} DETACH PARTITION {q}.{name} CONCURRENTLY",
                    t.table
                ))
                .await?;
        }
        client.batch_execute(&format!("DROP TABLE IF EXISTS {q}.{name}")).await?;
        tracing::info!(sink = "postgres", schema, partition = %name, "dropped partition past retention");
        dropped.push(t.day);
    }
    dropped.sort_unstable();
    dropped.dedup();
    Ok(dropped)
}

/// What a failed statement means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// `23505`: rows already stored (a redelivery or a replay); redo through staging.
    Duplicate,
    /// A row Postgres refuses (SQLSTATE class 22 data exception, 23 integrity other than
    /// 23505, `54000` a row too large for the index): bisect to find it.
    Data,
    /// The connection, the server or a conflict: reconnect and retry the same batch.
    Retry,
    /// Retrying cannot help (no such table, permission denied, bad configuration).
    Fatal,
}

/// Classifies a SQLSTATE; `None` (no server error: I/O, closed connection, timeout) is
/// [`Failure::Retry`].
pub(crate) fn classify(sqlstate: Option<&str>) -> Failure {
    let Some(code) = sqlstate else {
        return Failure::Retry;
    };
    match code {
        "23505" => Failure::Duplicate,
        "54000" => Failure::Data,
        _ if code.starts_with("22") || code.starts_with("23") => Failure::Data,
        // 42 syntax/access/undefined object, 3F no such schema, 3D no such database,
        // 28 authorization, 0A feature not supported.
        _ if ["42", "3F", "3D", "28", "0A"].iter().any(|c| code.starts_with(c)) => Failure::Fatal,
        // 08 connection, 53 resources, 57P shutdown, 40 conflicts, 55P03 lock timeout,
        // 57014 statement timeout, 58 server I/O, and anything unknown.
        _ => Failure::Retry,
    }
}

/// `SQLSTATE message (detail)` for a server error, the error's text otherwise.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} {} ({detail})", db.code().code(), db.message()),
            None => format!("{} {}", db.code().code(), db.message()),
        },
        // "error connecting to server" alone says nothing: give the causes after it
        // ("Connection refused (os error 111)").
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let c_text = c.to_string();
                if !text.contains(&c_text) {
                    text = format!("{text}: {c_text}");
                }
                cause = c.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_lower_case_identifiers() {
        for ok in ["public", "_x", "fp_test_1_2", "user"] {
            assert!(validate_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "Public", "a-b", "a\"b", "a b", "é", &"a".repeat(64)] {
            assert!(validate_schema_name(bad).is_err(), "{bad}");
        }
        assert_eq!(quote("user"), "\"user\"");
    }

    #[test]
    fn day_suffixes_round_trip_over_the_whole_partitionable_range() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(day_suffix(days_from_civil(2026, 1, 25)), "20260125");
        for day in [days_from_civil(1, 1, 1), -1, 0, 20_000, days_from_civil(9999, 12, 31)] {
            assert!(partitionable(day));
            assert_eq!(parse_day_suffix(&day_suffix(day)), Some(day), "{day}");
        }
        assert!(!partitionable(days_from_civil(1, 1, 1) - 1));
        assert!(!partitionable(days_from_civil(10_000, 1, 1)));
        assert_eq!(parse_day_suffix("20260230"), None);
        assert_eq!(parse_day_suffix("2026012"), None);
        assert_eq!(day_start(days_from_civil(2000, 2, 29)), "2000-02-29 00:00:00+00");
    }

    #[test]
    fn a_day_counts_as_present_only_when_every_table_has_an_attached_partition() {
        let t = |table, day, attached| DayTable { table, day, attached, detach_pending: false };
        let mut tables: Vec<DayTable> = TABLES.iter().map(|table| t(table, 1, true)).collect();
        tables.extend([
            t("locations", 2, true),
            t("diagnostics", 2, true),
            t("vehicle_events", 2, true),
            t("diagnostics", 3, false),
        ]);
        assert_eq!(complete_days(&tables), HashSet::from([1]), "day 2 lacks its trips partition");
    }

    #[test]
    fn sqlstates_map_to_what_the_batch_should_do() {
        assert_eq!(classify(Some("23505")), Failure::Duplicate);
        for data in ["22P05", "22008", "22003", "23514", "23502", "54000"] {
            assert_eq!(classify(Some(data)), Failure::Data, "{data}");
        }
        for retry in
            [None, Some("08006"), Some("57P01"), Some("53300"), Some("40P01"), Some("55P03"), Some("XX000")]
        {
            assert_eq!(classify(retry), Failure::Retry, "{retry:?}");
        }
        for fatal in ["42P01", "42501", "3F000", "28P01"] {
            assert_eq!(classify(Some(fatal)), Failure::Fatal, "{fatal}");
        }
    }
}
