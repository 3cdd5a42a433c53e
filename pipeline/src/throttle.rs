//! Repeated log lines, at most one per interval: a flood of the same failure (accept errors
//! while out of descriptors, a sink that keeps failing) must not become a flood of log.

use std::time::{Duration, Instant};

/// Lets one line through per `interval`, and says how many it held back since the last one.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Throttle {
        Throttle { interval, last: None, held_back: 0 }
    }

    /// `Some(held back since the last line)` when a line may be written now, else `None`
    /// (and the line is counted as held back).
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_those_held_back() {
        let mut t = Throttle::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(t.allow_at(start), Some(0));
        for i in 1..=999 {
            assert_eq!(t.allow_at(start + Duration::from_micros(i)), None);
        }
        assert_eq!(t.allow_at(start + Duration::from_secs(1)), Some(999));
        assert_eq!(t.allow_at(start + Duration::from_millis(1500)), None);
        assert_eq!(t.allow_at(start + Duration::from_secs(3)), Some(1));
    }
}
