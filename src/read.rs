//! The latest-state read path: L1 (in-process) → L2 (Redis) → Postgres (newest row), each miss
//! filling the tiers above it on the way back (L1 at once, L2 in the background), with `served_from` and `cache_requests_total{tier,result}`.
//! Near queries go to Redis' geo set when L2 is configured (every instance's vehicles), else L1.

use std::sync::Arc;

use fleetpipe_ingest::http::{
    count_cache, l1_near, l1_positions, BoxFuture, Found, Near, Nearby, ReadError, ReadPath, VehicleFilter,
};
use fleetpipe_pipeline::now_micros;
use fleetpipe_processors::latest::{LatestCache, Position, VehicleState};
use fleetpipe_processors::{Frame, Micros};
use fleetpipe_sinks::postgres::PostgresReader;
use fleetpipe_sinks::redis::RedisL2Reader;

/// The tiers an instance has: L1 always, L2 and Postgres when configured.
pub struct Tiers {
    pub l1: LatestCache,
    pub l2: Option<RedisL2Reader>,
    pub store: Option<PostgresReader>,
}

impl Tiers {
    async fn read_l2(&self, id: &str) -> Option<VehicleState> {
        let l2 = self.l2.clone()?;
        let key = id.to_owned();
        let got = tokio::task::spawn_blocking(move || l2.get(&key)).await;
        match got {
            Ok(Ok(Some(v))) => {
                count_cache("l2", true);
                Some(v.state)
            }
            Ok(Ok(None)) => {
                count_cache("l2", false);
                None
            }
            Ok(Err(e)) => {
                count_cache("l2", false);
                tracing::debug!(error = %e, "l2 read failed, falling through");
                None
            }
            Err(_) => None,
        }
    }
}

impl ReadPath for Tiers {
    fn vehicle<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Found>, ReadError>> {
        Box::pin(async move {
            if let Some(state) = self.l1.get(id) {
                count_cache("l1", true);
                return Ok(Some((state, "l1")));
            }
            count_cache("l1", false);
            if let Some(state) = self.read_l2(id).await {
                self.l1.fill(id, &state, now_micros());
                return Ok(Some((Arc::new(state), "l2")));
            }
            let Some(store) = &self.store else { return Ok(None) };
            match store.latest(id).await {
                Ok(Some(state)) => {
                    count_cache("postgres", true);
                    self.l1.fill(id, &state, now_micros());
                    let state = Arc::new(state);
                    if let Some(l2) = self.l2.clone() {
                        // Fill L2 for the other instances, off the request's path.
                        let (id, filled) = (id.to_owned(), Arc::clone(&state));
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = l2.fill(&id, &filled) {
                                tracing::debug!(vehicle_id = %id, error = %e, "l2 fill after a postgres read failed");
                            }
                        });
                    }
                    Ok(Some((state, "postgres")))
                }
                Ok(None) => {
                    count_cache("postgres", false);
                    Ok(None)
                }
                Err(e) => Err(ReadError::new("postgres", e)),
            }
        })
    }

    fn near(&self, q: Near) -> BoxFuture<'_, Result<Vec<Nearby>, ReadError>> {
        Box::pin(async move {
            let Some(l2) = self.l2.clone() else {
                return l1_near(self.l1.clone(), q).await;
            };
            let ids = tokio::task::spawn_blocking(move || l2.near(q.lat, q.lon, q.radius_m, q.limit))
                .await
                .map_err(|e| ReadError::new("l2", e))?
                .map_err(|e| ReadError::new("l2", e))?;
            let mut out = Vec::with_capacity(ids.len());
            for (id, d) in ids {
                let state = match self.l1.get(&id) {
                    Some(s) => Some(s),
                    None => self.read_l2(&id).await.map(Arc::new),
                };
                if let Some(s) = state {
                    out.push((s, d));
                }
            }
            Ok(out)
        })
    }

    fn track<'a>(
        &'a self,
        id: &'a str,
        from: Micros,
        to: Micros,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<Frame>>, ReadError>> {
        Box::pin(async move {
            let Some(store) = &self.store else { return Ok(None) };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            store.track(id, from, to, limit).await.map(Some).map_err(|e| match &e {
                // Postgres answered (a SQLSTATE): a retry will not help.
                fleetpipe_sinks::Error::Postgres { source, .. } if source.code().is_some() => {
                    ReadError::failed("postgres", e)
                }
                _ => ReadError::new("postgres", e),
            })
        })
    }

    fn has_history(&self) -> bool {
        self.store.is_some()
    }

    fn positions(
        &self,
        limit: usize,
        keep: VehicleFilter,
    ) -> BoxFuture<'_, Result<(Vec<Position>, u64), ReadError>> {
        Box::pin(l1_positions(self.l1.clone(), limit, keep))
    }
}
