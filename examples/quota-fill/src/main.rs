//! quota-fill: fills device memory in chunks until the driver refuses, then frees and allocates
//! again. Run it under gpuslice to watch a quota hold:
//!
//! ```sh
//! gpuslice run --memory 4GiB -- target/release/quota-fill 256
//! ```
//!
//! Arguments: chunk size in MiB (256), at most this many chunks (no cap), and seconds to hold
//! them before freeing (0), so that `gpuslice ls` and `top` can watch it.
//!
//! It uses cudarc, which loads the driver with `dlopen` + `dlsym` and allocates with
//! `cuMemAllocAsync`, so it also exercises the shim's `dlsym` route and the stream-ordered path.

use cudarc::driver::CudaContext;
use std::error::Error;

const MIB: usize = 1 << 20;

/// Device 0's context, or `None` when there is no driver to load: cudarc panics then
/// ("Unable to dynamically load..."), which must become a line that says what is missing.
fn open_device() -> Option<Result<std::sync::Arc<CudaContext>, cudarc::driver::DriverError>> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| CudaContext::new(0));
    std::panic::set_hook(hook);
    opened.ok()
}

fn main() -> Result<(), Box<dyn Error>> {
    let chunk_mib: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|_| format!("usage: quota-fill [CHUNK_MIB] [MAX_CHUNKS]; {arg:?} is not a number"))?,
        None => 256,
    };
    let max_chunks: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(usize::MAX);
    // Seconds to hold the chunks before freeing them: long enough to watch it in `gpuslice ls`.
    let hold_s: u64 = match std::env::args().nth(3) {
        Some(arg) => arg.parse().map_err(|_| format!("usage: quota-fill [CHUNK_MIB] [MAX_CHUNKS] [HOLD_SECONDS]; {arg:?} is not a number"))?,
        None => 0,
    };
    let ctx = match open_device() {
        Some(ctx) => ctx?,
        None => {
            eprintln!(
                "quota-fill: no CUDA driver found: libcuda.so (the NVIDIA driver's library) could not be loaded. \
                 Install the NVIDIA driver, or try the simulated GPU: `gpuslice run --simulate -- quota-fill 256` \
                 (README, \"Try it without a GPU\")"
            );
            std::process::exit(2);
        }
    };
    let (free, total) = ctx.mem_get_info()?;
    println!("device 0 as this process sees it: total {} MiB, free {} MiB", total / MIB, free / MIB);
    let stream = ctx.default_stream();
    let mut held = Vec::new();
    while held.len() < max_chunks {
        // SAFETY: the memory is never read.
        match unsafe { stream.alloc::<u8>(chunk_mib * MIB) } {
            Ok(slice) => held.push(slice),
            Err(e) => {
                println!("chunk {} of {chunk_mib} MiB refused: {e}", held.len() + 1);
                break;
            }
        }
    }
    println!("held {} chunks = {} MiB", held.len(), held.len() * chunk_mib);
    let (free, _) = ctx.mem_get_info()?;
    println!("free while holding them: {} MiB", free / MIB);
    if hold_s > 0 {
        use std::io::Write;
        println!("holding them for {hold_s} s");
        std::io::stdout().flush()?;
        std::thread::sleep(std::time::Duration::from_secs(hold_s));
    }
    drop(held);
    stream.synchronize()?;
    // SAFETY: as above.
    let again = unsafe { stream.alloc::<u8>(chunk_mib * MIB) };
    println!("after freeing everything, a new chunk: {}", if again.is_ok() { "allocated" } else { "refused" });
    Ok(())
}
