//! When the driver refuses an allocation for want of device memory (not the quota: that was
//! charged already), asks the controller to make room by suspending lower-priority suspendable
//! groups (issue 22), waiting a bounded time; the caller then tries the driver once more.

use gpuslice_common::protocol::{self, Request, Response, RoomRequest};
use gpuslice_common::size::format_size;
use std::time::Duration;

/// `GPUSLICE_MAKE_ROOM_WAIT_MS`: how long an allocation waits for room (0: it does not ask).
pub const ENV_WAIT: &str = "GPUSLICE_MAKE_ROOM_WAIT_MS";
const DEFAULT_WAIT_MS: u64 = 5000;

fn wait_ms() -> u64 {
    static WAIT: once_cell::sync::Lazy<u64> =
        once_cell::sync::Lazy::new(|| std::env::var(ENV_WAIT).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_WAIT_MS));
    *WAIT
}

/// True when the controller made room for `bytes` on CUDA device `device`: try again then.
/// Only under a controller, off the hot path (the driver has just said no).
#[cold]
pub fn ask(device: i32, bytes: u64, what: &str) -> bool {
    let wait = wait_ms();
    let (Some(socket), Some(link)) = (crate::state::link::controller_socket(), crate::state::link::get()) else { return false };
    let Some(index) = link.index(device) else { return false };
    if wait == 0 {
        return false;
    }
    let request = Request::MakeRoom(RoomRequest { device: index as u32, bytes, wait_ms: wait });
    // The controller may take the whole wait, then a suspension's copy: allow for both.
    let patience = Duration::from_millis(wait) + Duration::from_secs(60);
    let pid = std::process::id();
    match protocol::call(socket, &request, patience) {
        Ok((Response::Done { message }, _)) => {
            tracing::info!("pid {pid}: {what} of {} on device {device} did not fit; the controller made room: {message}", format_size(bytes));
            true
        }
        Ok((Response::Error { message }, _)) => {
            tracing::warn!(
                "pid {pid}: {what} of {} on device {device}: the device is full and no room was made within {wait} ms: {message}",
                format_size(bytes)
            );
            false
        }
        other => {
            tracing::warn!("pid {pid}: {what} of {} on device {device}: the controller did not answer a request for room ({other:?})", format_size(bytes));
            false
        }
    }
}
