//! `ptx-slice`: the slicer as a command, for machines without Rust (the GPU acceptance script).
//!
//!     ptx-slice IN.ptx|IN.fatbin OUT.ptx [--json OUT.json] [--cache DIR] [--repeat N] [--arch 90]
//!     ptx-slice plan GX GY GZ MAX_BLOCKS
//!
//! A fat binary's entries are listed and its uncompressed PTX for the highest architecture not
//! above `--arch` is sliced (exit 3 when it has none).
//! The first form writes the sliced module and prints, per kernel, `sliced` with its parameter
//! layout and where the slice parameter goes, or `refused` with the reasons; then the time the
//! transform took per MB of PTX (the best of N runs). The second prints the launches that cover a
//! grid, one `OX OY OZ GX GY GZ` line each. Exit status: 0 done, 1 the PTX does not parse, 2 usage
//! or I/O, 3 a fat binary with no PTX to slice.

use gpuslice_ptx::cache::{Cache, DEFAULT_CAP_BYTES};
use gpuslice_ptx::fatbin;
use gpuslice_ptx::params::ParamSlot;
use gpuslice_ptx::{plan_slices, slice_module, Dim3, ModuleOutcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: ptx-slice IN.ptx|IN.fatbin OUT.ptx [--json OUT.json] [--cache DIR] [--repeat N] [--arch 90]\n       ptx-slice plan GX GY GZ MAX_BLOCKS";

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("ptx-slice: {message}");
    ExitCode::from(code)
}

fn slot(p: &ParamSlot) -> String {
    format!("{}@{}+{}/{}", p.name, p.offset, p.size, p.align)
}

fn report(outcome: &ModuleOutcome) {
    for k in &outcome.kernels {
        let params: Vec<String> = k.params.iter().map(slot).collect();
        match &k.slice_param {
            Some(s) => {
                println!("kernel {}: sliced; params [{}]; slice param at offset {} ({} bytes, align {})", k.name, params.join(" "), s.offset, s.size, s.align)
            }
            None => println!("kernel {}: refused: {}", k.name, k.reasons.join("; ")),
        }
        for n in &k.notes {
            println!("  note: {n}");
        }
    }
}

/// Lists a fat binary's entries and returns the PTX to slice.
fn fatbin_ptx(image: &[u8], arch: u32) -> Option<String> {
    let entries = fatbin::entries(image).map_err(|e| eprintln!("ptx-slice: {e}")).ok()?;
    for e in &entries {
        let kind = if e.is_ptx() {
            "ptx".to_string()
        } else if e.kind == 2 {
            "elf".to_string()
        } else {
            format!("kind {}", e.kind)
        };
        println!("fatbin entry: {kind} sm_{} {} bytes{}", e.arch, e.payload.len(), if e.compressed { " compressed" } else { "" });
    }
    let (entry, text) = fatbin::ptx_for(image, arch)?;
    println!("fatbin: slicing the PTX for sm_{}", entry.arch);
    Some(text.to_string())
}

fn plan(args: &[String]) -> ExitCode {
    let nums: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if nums.len() != 4 || args.len() != 4 || nums[..3].iter().any(|&n| n > u32::MAX as u64) {
        return fail(2, USAGE);
    }
    for s in plan_slices(Dim3::new(nums[0] as u32, nums[1] as u32, nums[2] as u32), nums[3]) {
        println!("{} {} {} {} {} {}", s.offset.x, s.offset.y, s.offset.z, s.grid.x, s.grid.y, s.grid.z);
    }
    ExitCode::SUCCESS
}

struct Options {
    input: PathBuf,
    output: PathBuf,
    json: Option<PathBuf>,
    cache: Option<PathBuf>,
    repeat: u32,
    arch: u32,
}

fn options(args: &[String]) -> Option<Options> {
    let mut positional = Vec::new();
    let (mut json, mut cache, mut repeat, mut arch) = (None, None, 1, 90);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => json = Some(PathBuf::from(it.next()?)),
            "--cache" => cache = Some(PathBuf::from(it.next()?)),
            "--repeat" => repeat = it.next()?.parse().ok().filter(|&n| n > 0)?,
            "--arch" => arch = it.next()?.parse().ok()?,
            _ if a.starts_with("--") => return None,
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [input, output] = <[PathBuf; 2]>::try_from(positional).ok()?;
    Some(Options { input, output, json, cache, repeat, arch })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("plan") {
        return plan(&args[1..]);
    }
    let Some(opts) = options(&args) else { return fail(2, USAGE) };
    let image = match std::fs::read(&opts.input) {
        Ok(t) => t,
        Err(e) => return fail(2, &format!("{}: {e}", opts.input.display())),
    };
    let text = if fatbin::is_fatbin(&image) {
        match fatbin_ptx(&image, opts.arch) {
            Some(t) => t,
            None => return fail(3, &format!("{}: no uncompressed PTX for sm_{} or below", opts.input.display(), opts.arch)),
        }
    } else {
        match String::from_utf8(image) {
            Ok(t) => t,
            Err(_) => return fail(1, &format!("{}: neither PTX text nor a fat binary", opts.input.display())),
        }
    };
    let mut best = Duration::MAX;
    let mut outcome = None;
    for _ in 0..opts.repeat {
        let start = Instant::now();
        match slice_module(&text) {
            Ok(o) => outcome = Some(o),
            Err(e) => return fail(1, &format!("{}: {e}", opts.input.display())),
        }
        best = best.min(start.elapsed());
    }
    let outcome = outcome.expect("repeat is at least 1");
    if let Some(dir) = &opts.cache {
        let cache = match Cache::open(dir, DEFAULT_CAP_BYTES) {
            Ok(c) => c,
            Err(e) => return fail(2, &e.to_string()),
        };
        let start = Instant::now();
        match cache.get_or_slice(&text) {
            Ok((cached, hit)) if cached == outcome => {
                println!("cache: {} in {:.3} ms", if hit { "hit" } else { "miss, stored" }, start.elapsed().as_secs_f64() * 1e3)
            }
            Ok(_) => return fail(2, "the cache gave a different result than the transform"),
            Err(e) => return fail(1, &e.to_string()),
        }
    }
    if let Err(e) = std::fs::write(&opts.output, &outcome.ptx) {
        return fail(2, &format!("{}: {e}", opts.output.display()));
    }
    if let Some(json) = &opts.json {
        let written = serde_json::to_string_pretty(&outcome).map_err(std::io::Error::other).and_then(|j| std::fs::write(json, j));
        if let Err(e) = written {
            return fail(2, &format!("{}: {e}", json.display()));
        }
    }
    report(&outcome);
    let sliced = outcome.kernels.iter().filter(|k| k.sliced).count();
    let ms = best.as_secs_f64() * 1e3;
    let mb = text.len() as f64 / 1e6;
    println!(
        "transform: {} bytes, {} kernels ({sliced} sliced, {} refused), best of {}: {ms:.3} ms = {:.1} ms per MB",
        text.len(),
        outcome.kernels.len(),
        outcome.kernels.len() - sliced,
        opts.repeat,
        ms / mb.max(1e-9)
    );
    ExitCode::SUCCESS
}
