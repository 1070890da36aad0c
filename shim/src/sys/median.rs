//! The upper median of the last eight samples: what the slicer (`slice_cost`) and the duration
//! budget (`flight_cost`) take as a kernel's device time. One stretched or shrunk sample does not
//! move it, and between the two middle samples it takes the longer: an estimate too long costs
//! throughput, one too short costs the high-priority process latency.

const WINDOW: usize = 8;

#[derive(Default, Clone, Copy, Debug)]
pub struct Median {
    samples: [u64; WINDOW],
    next: usize,
    filled: usize,
}

impl Median {
    pub fn push(&mut self, v: u64) {
        self.samples[self.next] = v;
        self.next = (self.next + 1) % WINDOW;
        self.filled = (self.filled + 1).min(WINDOW);
    }

    /// The upper median, `None` before the first sample.
    pub fn get(&self) -> Option<u64> {
        let mut live = self.samples;
        let live = &mut live[..self.filled];
        live.sort_unstable();
        live.get(live.len() / 2).copied()
    }

    pub fn len(&self) -> usize {
        self.filled
    }
}

#[cfg(test)]
mod tests {
    use super::Median;

    #[test]
    fn the_upper_median_of_the_last_eight() {
        let mut m = Median::default();
        assert_eq!(m.get(), None);
        m.push(400);
        assert_eq!(m.get(), Some(400));
        // One short sample does not pull the estimate down at once.
        m.push(1);
        assert_eq!(m.get(), Some(400));
        m.push(380);
        assert_eq!(m.get(), Some(380));
        for _ in 0..8 {
            m.push(100);
        }
        assert_eq!(m.get(), Some(100), "older samples leave the window");
        assert_eq!(m.len(), 8);
    }
}
