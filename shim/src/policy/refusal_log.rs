//! Rate limit for the refusal log line: a program that retries an allocation that does not fit
//! (a framework backing off, a loop) would otherwise write a WARN per try, about 20 a second.
//! The first refusal is logged; later ones at most once per interval, with the count of those
//! that were not (they still go to the debug level).

use std::sync::atomic::{AtomicU64, Ordering::*};

/// Default interval between logged refusals.
const DEFAULT_INTERVAL_NS: u64 = 5_000_000_000;

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, saying how many were not logged over the last `since_ns`.
    Log { unlogged: u64, since_ns: u64 },
    /// Counted for the next logged line.
    Quiet,
}

pub struct RateLimit {
    interval_ns: u64,
    /// When the last line was logged (ns on the caller's clock, `clock::host_ns` for the hooks; +1 so that 0 means never).
    last: AtomicU64,
    unlogged: AtomicU64,
}

impl RateLimit {
    pub fn new(interval_ns: u64) -> RateLimit {
        RateLimit { interval_ns, last: AtomicU64::new(0), unlogged: AtomicU64::new(0) }
    }

    /// The interval from `GPUSLICE_REFUSAL_LOG_INTERVAL_MS` (tests shorten it), else 5 s.
    pub fn from_env() -> RateLimit {
        let ms = std::env::var("GPUSLICE_REFUSAL_LOG_INTERVAL_MS").ok().and_then(|v| v.trim().parse::<u64>().ok());
        RateLimit::new(ms.map_or(DEFAULT_INTERVAL_NS, |ms| ms.saturating_mul(1_000_000)))
    }

    /// Decides for a refusal at `now` (any monotonic ns clock).
    pub fn admit(&self, now: u64) -> Verdict {
        let stamp = now.saturating_add(1);
        let last = self.last.load(Acquire);
        let due = last == 0 || stamp.saturating_sub(last) >= self.interval_ns;
        if due && self.last.compare_exchange(last, stamp, AcqRel, Relaxed).is_ok() {
            let unlogged = self.unlogged.swap(0, AcqRel);
            return Verdict::Log { unlogged, since_ns: if last == 0 { 0 } else { stamp - last } };
        }
        self.unlogged.fetch_add(1, AcqRel);
        Verdict::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_refusal_logged_then_one_line_per_interval_with_the_count() {
        let r = RateLimit::new(5_000);
        assert_eq!(r.admit(100), Verdict::Log { unlogged: 0, since_ns: 0 });
        for t in (150..5_000).step_by(50) {
            assert_eq!(r.admit(t), Verdict::Quiet, "at {t}");
        }
        // 97 quiet ones from 150 to 4950; the next line after the interval carries them.
        assert_eq!(r.admit(5_100), Verdict::Log { unlogged: 97, since_ns: 5_000 });
        assert_eq!(r.admit(5_200), Verdict::Quiet);
        assert_eq!(r.admit(20_000), Verdict::Log { unlogged: 1, since_ns: 14_900 });
    }

    #[test]
    fn threads_refused_at_once_log_one_line() {
        let r = std::sync::Arc::new(RateLimit::new(u64::MAX));
        let logged: u64 = (0..8)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..1000).filter(|_| matches!(r.admit(7), Verdict::Log { .. })).count() as u64)
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(logged, 1);
        assert_eq!(r.unlogged.load(Relaxed), 7999);
    }
}
