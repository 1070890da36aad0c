//! What held a lower-priority process's launches back, summed into a debug line every 2 s.
//!
//! A neighbour beside a high-priority process loses time three ways: waiting while a request
//! runs, waiting for room in its queue or duration budget, and (anticipation) waiting before a
//! request that is due. Issue 19's PyTorch neighbours kept 66–78 % of the time a probe left
//! them, and which of the three took the rest decides what to change. The line says it from
//! the neighbour's own side: `GPUSLICE_LOG=info,gpuslice::policy::hold_summary=debug`.
//!
//! The three are host time of the launching thread, not device time lost: a neighbour that
//! floods the device waits for room nearly all the time while its own work keeps the device
//! busy. Time held while requests ran or before they were due is the time the neighbour gave
//! up; room beyond its own kernels' length is a queue too shallow to cover its host's gaps.
//!
//! Nothing is measured unless that target is enabled for debug (`enabled`): the launch path
//! then reads the clock around each wait; otherwise it costs one cached filter check. The
//! totals are process-wide atomics, so every launching thread adds to them without a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How often the line is written (of launch time: a process that stops launching writes none).
const EVERY_NS: u64 = 2_000_000_000;

/// Time one launch waited, by reason, in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waits {
    /// While a high-priority process had work on the device.
    pub busy: u64,
    /// For room among this process's own launches in flight (queue bound or duration budget).
    pub room: u64,
    /// Before a high-priority request that was due (anticipation).
    pub due: u64,
}

impl Waits {
    fn total(&self) -> u64 {
        // Saturating: the parts are clock differences, and a debug build must not panic on them.
        self.busy.saturating_add(self.room).saturating_add(self.due)
    }
}

/// Running totals since the last line.
struct Totals {
    since: AtomicU64,
    launches: AtomicU64,
    held: AtomicU64,
    busy: AtomicU64,
    room: AtomicU64,
    due: AtomicU64,
}

impl Totals {
    const fn new() -> Self {
        Self {
            since: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            held: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            room: AtomicU64::new(0),
            due: AtomicU64::new(0),
        }
    }

    /// Adds a launch and its waits at `now`; returns the line when `EVERY_NS` has passed since
    /// the last one (one thread gets it: the one that moves `since` on).
    fn add(&self, now: u64, waits: Waits) -> Option<String> {
        let since = match self.since.load(Relaxed) {
            0 => {
                // The first launch starts the first period (a lost race only means a launch or
                // two counted into the period that another thread started).
                let _ = self.since.compare_exchange(0, now.max(1), Relaxed, Relaxed);
                self.since.load(Relaxed)
            }
            s => s,
        };
        self.launches.fetch_add(1, Relaxed);
        if waits.total() > 0 {
            self.held.fetch_add(1, Relaxed);
            self.busy.fetch_add(waits.busy, Relaxed);
            self.room.fetch_add(waits.room, Relaxed);
            self.due.fetch_add(waits.due, Relaxed);
        }
        let elapsed = now.saturating_sub(since);
        if elapsed < EVERY_NS || self.since.compare_exchange(since, now.max(1), Relaxed, Relaxed).is_err() {
            return None;
        }
        let launches = self.launches.swap(0, Relaxed);
        let held = self.held.swap(0, Relaxed);
        let [busy, room, due] = [&self.busy, &self.room, &self.due].map(|a| a.swap(0, Relaxed));
        let ms = |ns: u64| ns as f64 / 1e6;
        let per_s = |ns: u64| ns as f64 / elapsed as f64 * 1e3;
        Some(format!(
            "{launches} launches in {:.1} s, {held} of them held: {:.1} ms while high-priority work ran ({:.1} ms/s), \
             {:.1} ms for room in flight ({:.1} ms/s), {:.1} ms before requests due ({:.1} ms/s)",
            elapsed as f64 / 1e9,
            ms(busy),
            per_s(busy),
            ms(room),
            per_s(room),
            ms(due),
            per_s(due),
        ))
    }
}

static TOTALS: Totals = Totals::new();

/// True when the line is wanted: only then does the launch path time its waits.
#[inline]
pub fn enabled() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
}

/// Counts a lower-priority launch that waited `waits`; writes the line when one is due.
pub fn note(now: u64, waits: Waits) {
    if let Some(line) = TOTALS.add(now, waits) {
        tracing::debug!("pid {}: {line}", std::process::id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_line_every_two_seconds_splits_the_held_time_by_reason() {
        let t = Totals::new();
        let start = 10 * MS;
        assert_eq!(t.add(start, Waits::default()), None);
        assert_eq!(t.add(start + 500 * MS, Waits { busy: 2 * MS, room: 0, due: MS / 2 }), None);
        assert_eq!(t.add(start + 1500 * MS, Waits { busy: 0, room: 3 * MS, due: 0 }), None);
        let line = t.add(start + 2000 * MS, Waits { busy: 4 * MS, room: 0, due: 0 }).expect("a line after 2 s");
        assert_eq!(
            line,
            "4 launches in 2.0 s, 3 of them held: 6.0 ms while high-priority work ran (3.0 ms/s), \
             3.0 ms for room in flight (1.5 ms/s), 0.5 ms before requests due (0.2 ms/s)"
        );
        // The next period starts empty, from the line's instant.
        assert_eq!(t.add(start + 3000 * MS, Waits::default()), None);
        let line = t.add(start + 4000 * MS, Waits::default()).expect("the second line");
        assert!(line.starts_with("2 launches in 2.0 s, 0 of them held: 0.0 ms"), "{line}");
    }

    #[test]
    fn threads_that_race_for_a_line_write_it_once() {
        let t = std::sync::Arc::new(Totals::new());
        t.add(1, Waits::default());
        let lines: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let t = &t;
                    s.spawn(move || (0..1000).filter(|_| t.add(1 + EVERY_NS, Waits { busy: 1, room: 0, due: 0 }).is_some()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(lines, 1);
    }
}
