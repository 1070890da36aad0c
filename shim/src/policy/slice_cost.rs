//! How many blocks a slice of a sliced kernel gets: from the measured device time of its blocks
//! (two timing events around one launch of it: the first few launches, then every 16th), in
//! whole waves of the blocks the device holds at once, so that a slice lasts about `TARGET_NS`
//! and a high-priority request waits for at most one slice.

use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::sys::median::Median;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// How long a slice should last: what a high-priority request may wait for.
pub const TARGET_NS: u64 = 100_000;
const SAMPLE_EVERY: u64 = 16;
const FIRST_SAMPLES: usize = 4;
/// A measured launch shorter than this says little of its blocks (launch latency, the events'
/// resolution), only that they are short: it is no estimate, but the next slices get at least
/// twice its blocks (`Sampler::grow`), and so on from one such measurement to the next until a
/// longer one gives an estimate. The first version dropped such measurements and nothing more:
/// a kernel of short blocks then stayed in slices of one block per SM for good (each measured
/// at 4 µs of blocks and 5 µs of launch latency), and the H100's 3.3 ms neighbour kept 6.9 % of
/// its rate beside the probe (stop 17). Nor is it counted as 10 µs (slices ten times as large
/// next): after a warm-up launch of a small problem (1 µs of 5280 blocks in `slicing.rs`'s
/// latency test) the next real launch's slices would be five times the target; doubled, they
/// are 100 µs there.
const MIN_SAMPLE_NS: u64 = 10_000;
/// How often the debug line (`GPUSLICE_LOG=debug`) sums a kernel's launches up.
const SUMMARY_EVERY_NS: u64 = 2_000_000_000;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const ATTR_SMS: i32 = 16;

/// Two timing events of one context.
#[derive(Clone, Copy)]
pub struct Events {
    ctx: usize,
    start: usize,
    end: usize,
}

/// A sliced kernel's recent measurements (device time per block), the wave of its last shape,
/// and what the debug line counts.
#[derive(Default)]
pub struct Sampler {
    /// Picoseconds per block: a short kernel of a million blocks costs less than a ns each.
    samples: Median,
    launches: u64,
    /// The events (created at the first measurement).
    events: Option<Events>,
    /// Blocks of the measured launch whose end event has not been read yet.
    pending: Option<u64>,
    /// The events are lent to a launch of another thread.
    lent: bool,
    /// Resident blocks per SM for the last launch's (threads per block, dynamic shared memory).
    occupancy: Option<(u32, u32, u64)>,
    /// The fewest blocks a slice gets: twice those of the last launch measured under
    /// `MIN_SAMPLE_NS` since the last longer measurement (0: none).
    grow: u64,
    summary: Summary,
}

/// What a kernel's launches did since its last debug line.
#[derive(Default)]
struct Summary {
    since_ns: u64,
    launches: u64,
    split: u64,
    slices: u64,
    blocks: u64,
    samples: u64,
    short: u64,
    /// The last sample: device ns and blocks.
    last: Option<(u64, u64)>,
}

impl Sampler {
    /// Device time of one block in picoseconds: the upper median of the recent samples
    /// (`median`). Not the least: one launch with a smaller problem (a warm-up, a short batch)
    /// would make every slice after it too long, and a slice too long is what a high-priority
    /// request waits for.
    pub fn block_ps(&self) -> Option<u64> {
        self.samples.get()
    }

    /// Blocks per slice of a launch of `f` in this shape on `device`, and the wave they are
    /// counted in (see `blocks_per_slice`).
    pub fn max_blocks(&mut self, device: CUdevice, f: *mut c_void, block: [u32; 3], shared_mem: u32) -> (u64, u64) {
        let wave = self.wave(device, f, block, shared_mem);
        (blocks_per_slice(wave, self.block_ps(), self.grow), wave)
    }

    /// Reads a finished measurement, and lends the events out when this launch is to be measured
    /// (in the current context, `ctx()`) and `may` says it can be (its stream is not capturing).
    /// Asks nothing of the driver when there is nothing to read or measure. Called before the
    /// launch is planned, so that a measurement read now sizes its slices.
    pub fn begin(&mut self, ctx: impl FnOnce() -> Option<usize>, may: impl FnOnce() -> bool) -> Option<Events> {
        self.launches += 1;
        let due = self.samples.len() < FIRST_SAMPLES || self.launches.is_multiple_of(SAMPLE_EVERY);
        if self.lent || (!due && self.pending.is_none()) {
            return None;
        }
        let ctx = ctx()?;
        let events = match self.events {
            Some(e) if e.ctx != ctx => return None,
            Some(e) => e,
            None => {
                let e = Events { ctx, start: create()?, end: create()? };
                self.events = Some(e);
                e
            }
        };
        if let Some(blocks) = self.pending {
            if call_real!(cuEventQuery(events.end as *mut c_void)) == CUDA_ERROR_NOT_READY {
                return None;
            }
            self.pending = None;
            let mut ms = 0f32;
            let ok = call_real!(cuEventElapsedTime(&mut ms, events.start as *mut c_void, events.end as *mut c_void)) == CUDA_SUCCESS;
            if ok && ms >= 0.0 {
                self.take((f64::from(ms) * 1e6) as u64, blocks);
            }
        }
        let due = due && may();
        self.lent = due;
        due.then_some(events)
    }

    /// Takes the events back after a launch of `blocks` blocks between them (`measured`: both
    /// events and the launch went in).
    pub fn end(&mut self, events: Events, blocks: u64, measured: bool) {
        self.events = Some(events);
        self.lent = false;
        self.pending = measured.then_some(blocks);
    }

    /// A launch of `blocks` blocks took `ns` of device time.
    fn take(&mut self, ns: u64, blocks: u64) {
        tracing::trace!("slice measured: {ns} ns over {blocks} blocks");
        let blocks = blocks.max(1);
        if ns < MIN_SAMPLE_NS {
            self.grow = self.grow.max(blocks.saturating_mul(2));
            self.summary.short += 1;
        } else {
            self.samples.push((ns.saturating_mul(1000) / blocks).max(1));
            self.grow = 0;
            self.summary.samples += 1;
        }
        self.summary.last = Some((ns, blocks));
    }

    /// Blocks the device runs at once for a launch of `f` in this shape: SMs × resident blocks
    /// per SM (`cuOccupancyMaxActiveBlocksPerMultiprocessor`, asked again only when the shape
    /// changes; one per SM when the driver cannot say). A slice of fewer blocks is no shorter.
    fn wave(&mut self, device: CUdevice, f: *mut c_void, block: [u32; 3], shared_mem: u32) -> u64 {
        let threads = block.iter().map(|&b| u64::from(b)).product::<u64>();
        let threads = u32::try_from(threads).unwrap_or(u32::MAX);
        let per_sm = match self.occupancy {
            Some((t, s, n)) if t == threads && s == shared_mem => n,
            _ => {
                let n = occupancy(f, threads, shared_mem);
                self.occupancy = Some((threads, shared_mem, n));
                n
            }
        };
        sms(device).saturating_mul(per_sm)
    }

    /// Counts a launch for the debug line (`slices` launches of `blocks` blocks in all; `split`:
    /// it went in slices) and returns the line when one is due, every `SUMMARY_EVERY_NS` of
    /// launches. For `GPUSLICE_LOG=debug` only: the caller asks nothing otherwise.
    pub fn summary(&mut self, now_ns: u64, slices: usize, blocks: u64, split: bool, wave: u64) -> Option<String> {
        let s = &mut self.summary;
        if s.launches == 0 {
            s.since_ns = now_ns;
        }
        s.launches += 1;
        s.split += u64::from(split);
        if split {
            s.slices += slices as u64;
            s.blocks += blocks;
        }
        let elapsed = now_ns.saturating_sub(s.since_ns);
        if elapsed < SUMMARY_EVERY_NS {
            return None;
        }
        let line = format!(
            "{} launches in {:.1} s, {} in slices: {} slices of {} blocks on average (wave {wave}); estimate {} ps per block ({} samples, {} under {} µs, at least {} blocks; last {})",
            s.launches,
            elapsed as f64 / 1e9,
            s.split,
            s.slices,
            s.blocks.checked_div(s.slices).unwrap_or(0),
            self.samples.get().map_or("none".into(), |ps| ps.to_string()),
            s.samples,
            s.short,
            MIN_SAMPLE_NS / 1000,
            self.grow,
            s.last.map_or("none".into(), |(ns, b)| format!("{} ns over {b} blocks", ns)),
        );
        *s = Summary::default();
        Some(line)
    }
}

/// Runs `launch` of `blocks` blocks on `stream` between `events` (when lent); true when all three
/// went in, so that the sample is good.
pub fn measured(events: Option<Events>, stream: CUstream, launch: impl FnOnce() -> CuResult) -> (CuResult, bool) {
    let Some(e) = events else { return (launch(), false) };
    let record = |ev: usize| driver().is_some_and(|d| d.record_event(ev, stream));
    let started = record(e.start);
    let code = launch();
    let ended = code == CUDA_SUCCESS && record(e.end);
    (code, started && ended)
}

fn create() -> Option<usize> {
    let mut ev: *mut c_void = std::ptr::null_mut();
    (call_real!(cuEventCreate(&mut ev, 0)) == CUDA_SUCCESS && !ev.is_null()).then_some(ev as usize)
}

/// Resident blocks of `f` per SM at `threads` per block and `shared_mem` bytes of dynamic shared
/// memory; 1 when the driver cannot tell.
fn occupancy(f: *mut c_void, threads: u32, shared_mem: u32) -> u64 {
    let Ok(threads) = c_int::try_from(threads) else { return 1 };
    let mut n: c_int = 0;
    let ok = call_real!(cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, threads, shared_mem as usize)) == CUDA_SUCCESS;
    if ok && n > 0 {
        n as u64
    } else {
        1
    }
}

/// SMs per device, read once.
static SMS: [AtomicU32; 64] = [const { AtomicU32::new(0) }; 64];

fn sms(device: CUdevice) -> u64 {
    let Some(cell) = usize::try_from(device).ok().and_then(|d| SMS.get(d)) else { return 1 };
    let known = cell.load(Relaxed);
    if known != 0 {
        return u64::from(known);
    }
    let mut v = 0;
    let n = if call_real!(cuDeviceGetAttribute(&mut v, ATTR_SMS, device)) == CUDA_SUCCESS && v > 0 { v as u32 } else { 1 };
    cell.store(n, Relaxed);
    u64::from(n)
}

/// Blocks per slice: `TARGET_NS` of measured block time (`block_ps`, picoseconds), one wave
/// until a measurement exists, and at least `grow` (short measurements since, see
/// `MIN_SAMPLE_NS`); in whole waves, since the blocks of a part-filled last wave take as long as
/// a full one, and at least one (fewer does not make a slice shorter, only the slices more
/// numerous).
fn blocks_per_slice(wave: u64, block_ps: Option<u64>, grow: u64) -> u64 {
    let wave = wave.max(1);
    let blocks = match block_ps {
        None => wave,
        Some(ps) => gpuslice_ptx::plan::blocks_per_slice(TARGET_NS.saturating_mul(1000), ps, wave),
    };
    blocks.max(grow).max(wave) / wave * wave
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_whole_waves_of_the_target_and_one_wave_before_a_measurement() {
        assert_eq!(blocks_per_slice(2112, None, 0), 2112);
        // 2 ns a block: 50 000 blocks make 100 µs, 23.7 waves: 23 of them.
        assert_eq!(blocks_per_slice(2112, Some(2_000), 0), 23 * 2112);
        // Blocks longer than the target: one wave all the same.
        assert_eq!(blocks_per_slice(132, Some(1_000_000_000), 0), 132);
        // Blocks far shorter than a ns (a short kernel of many blocks) are not rounded to 1 ns.
        assert_eq!(blocks_per_slice(1, Some(100), 0), 1_000_000);
        assert_eq!(blocks_per_slice(0, None, 0), 1);
        // Short measurements raise the floor; whole waves still.
        assert_eq!(blocks_per_slice(2112, None, 2 * 2112), 2 * 2112);
        assert_eq!(blocks_per_slice(2112, Some(1_000_000_000), 5000), 2 * 2112);
        assert_eq!(blocks_per_slice(2112, Some(2_000), 2 * 2112), 23 * 2112);
    }

    #[test]
    fn a_short_measurement_doubles_the_slice_until_a_longer_one_gives_an_estimate() {
        let mut s = Sampler::default();
        s.take(9_000, 2112);
        assert_eq!((s.block_ps(), s.grow), (None, 2 * 2112), "9 µs over a wave: no estimate, two waves next");
        s.take(9_500, 2 * 2112);
        assert_eq!(s.grow, 4 * 2112);
        s.take(3_000, 100);
        assert_eq!(s.grow, 4 * 2112, "a short launch of fewer blocks lowers nothing");
        s.take(21_000, 4 * 2112);
        assert_eq!((s.block_ps(), s.grow), (Some(21_000_000 / (4 * 2112)), 0), "a longer measurement is an estimate");
        s.take(2_000, 2112);
        assert_eq!(s.block_ps(), Some(21_000_000 / (4 * 2112)), "short ones never enter the estimate");
    }

    /// The device of the GPU run's 10 ms neighbour: blocks of `block_ns`, 2112 at a time, 5 µs
    /// from the start event to the kernel; a slice of `blocks` lasts its waves and the latency.
    fn measured_ns(blocks: u64, block_ns: u64) -> u64 {
        5_000 + blocks.div_ceil(2112) * block_ns
    }

    /// Slice sizes of `launches` launches in a row, each planned from the samples so far, its
    /// first slice measured (the shim measures every launch until four samples exist, then every
    /// 16th; here all).
    fn ramp(launches: usize, block_ns: u64) -> Vec<u64> {
        let mut s = Sampler::default();
        (0..launches)
            .map(|_| {
                let blocks = blocks_per_slice(2112, s.block_ps(), s.grow);
                s.take(measured_ns(blocks, block_ns), blocks);
                blocks
            })
            .collect()
    }

    #[test]
    fn slices_of_short_blocks_grow_from_one_wave_to_about_the_target() {
        for block_ns in [4_000, 1_000, 300] {
            let sizes = ramp(12, block_ns);
            let last = *sizes.last().unwrap();
            assert!(sizes[0] == 2112 && sizes.windows(2).all(|w| w[1] >= w[0]), "{block_ns} ns blocks: slices should grow: {sizes:?}");
            let ns = measured_ns(last, block_ns);
            assert!((75_000..=TARGET_NS + 5_000).contains(&ns), "{block_ns} ns blocks: after twelve launches a slice lasts {ns} ns ({sizes:?})");
        }
    }

    #[test]
    fn the_summary_line_comes_every_two_seconds_of_launches() {
        let mut s = Sampler::default();
        s.take(9_000, 2112);
        assert_eq!(s.summary(1_000, 30, 50_000, true, 2112), None);
        let line = s.summary(1_000 + SUMMARY_EVERY_NS, 1, 50_000, false, 2112).expect("a line after 2 s");
        assert!(line.starts_with("2 launches in 2.0 s, 1 in slices: 30 slices of 1666 blocks on average (wave 2112)"), "{line}");
        assert!(line.contains("estimate none ps per block (0 samples, 1 under 10 µs, at least 4224 blocks; last 9000 ns over 2112 blocks)"), "{line}");
        assert_eq!(s.summary(2 + SUMMARY_EVERY_NS, 1, 1, false, 1), None, "counts start over");
    }
}
