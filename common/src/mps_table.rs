//! The controller's MPS table (issue 19, managed spatial mode): for each GPU it manages, whether
//! its processes run over MPS (`spatial`) or time-sliced, and where that GPU's MPS control
//! daemon listens. The controller writes it; each shim reads it once, before its driver starts.
//!
//! A file, not the ledger: MPS is chosen when the driver starts (`cuInit` connects to the
//! daemon named by `CUDA_MPS_PIPE_DIRECTORY`), and a shim maps the ledger only after `cuInit`,
//! when it can name its devices by UUID to register. The file lies beside the controller's
//! socket (`<socket>.mps`), in the controller's own directory: tenants read it, none can write
//! it, so no tenant changes the mode another process gets; containers that are given the
//! socket's directory (the DRA plugin mounts it) see it as well.

use std::path::{Path, PathBuf};

/// The first line; a table without it is not read.
pub const HEADER: &str = "# gpuslice mps table 1";

/// The table of the controller whose socket is `socket`.
pub fn path_for(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".mps");
    name.into()
}

/// How a GPU's processes share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Over the GPU's MPS daemon: one hardware context for all.
    Spatial,
    /// Each process its own context, the GPU switching between them.
    TimeSliced,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Spatial => "spatial",
            Mode::TimeSliced => "time-sliced",
        }
    }
}

/// One GPU's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// As NVML (or the operator) names it: "GPU-..." or "MIG-...".
    pub uuid: String,
    pub mode: Mode,
    /// The daemon's pipe directory; only a spatial entry has one.
    pub pipe: Option<String>,
    /// The uids of the registered processes that use the GPU. An MPS server runs one uid's
    /// clients at a time: a client of another uid waits in `cuInit` until every client of the
    /// running server has exited, so a shim of another uid does not go to a daemon in use.
    pub users: Vec<u32>,
    /// Why, for people reading the file.
    pub why: String,
}

/// The file's text: the header, a comment, one line per GPU
/// (`<uuid> <mode> <pipe or -> <uids, or -> <why>`).
pub fn render(entries: &[Entry]) -> String {
    let mut out = format!("{HEADER}\n# <uuid> spatial|time-sliced <MPS pipe directory, or -> <uids using the GPU, or -> <why>\n");
    for e in entries {
        let pipe = e.pipe.as_deref().filter(|_| e.mode == Mode::Spatial).unwrap_or("-");
        let users = if e.users.is_empty() { "-".to_string() } else { e.users.iter().map(u32::to_string).collect::<Vec<_>>().join(",") };
        out.push_str(&format!("{} {} {pipe} {users} {}\n", e.uuid, e.mode.as_str(), e.why.replace('\n', " ")));
    }
    out
}

/// The entries of a table's text; nothing when the header is not this version's. A line that
/// does not parse, or a spatial line without an absolute pipe directory, is left out.
pub fn parse(text: &str) -> Vec<Entry> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Vec::new();
    }
    lines
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.splitn(5, ' ');
            let uuid = words.next().filter(|u| u.starts_with("GPU-") || u.starts_with("MIG-"))?.to_string();
            let mode = match words.next()? {
                "spatial" => Mode::Spatial,
                "time-sliced" => Mode::TimeSliced,
                _ => return None,
            };
            let pipe = words.next().filter(|p| *p != "-").map(str::to_string);
            if mode == Mode::Spatial && !pipe.as_deref().is_some_and(|p| p.starts_with('/')) {
                return None;
            }
            let users = match words.next()? {
                "-" => Vec::new(),
                list => list.split(',').map(|u| u.parse().ok()).collect::<Option<Vec<u32>>>()?,
            };
            Some(Entry { uuid, mode, pipe, users, why: words.next().unwrap_or("").to_string() })
        })
        .collect()
}

/// The entry of the GPU that `name` names as `CUDA_VISIBLE_DEVICES` may: its whole UUID or a
/// prefix of it ("GPU-" included), any case; `None` unless exactly one entry matches.
pub fn find<'a>(entries: &'a [Entry], name: &str) -> Option<&'a Entry> {
    let name = name.trim().to_ascii_lowercase();
    if name.len() <= 4 {
        return None;
    }
    let mut found = entries.iter().filter(|e| e.uuid.to_ascii_lowercase().starts_with(&name));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "GPU-5e1cc0da-9a3b-4c11-8e2f-600000000000";
    const B: &str = "GPU-5e1cc0da-9a3b-4c12-8e2f-600000000001";

    #[test]
    fn a_rendered_table_reads_back() {
        let entries = vec![
            Entry { uuid: A.into(), mode: Mode::Spatial, pipe: Some(format!("/run/gpuslice/mps/{A}")), users: vec![0, 1000], why: "on".into() },
            Entry { uuid: B.into(), mode: Mode::TimeSliced, pipe: None, users: vec![], why: "auto: no high-priority group".into() },
        ];
        let text = render(&entries);
        assert!(text.starts_with(HEADER));
        assert_eq!(parse(&text), entries);
        assert!(parse(&text.replacen("table 1", "table 2", 1)).is_empty(), "another version is not read");
    }

    #[test]
    fn a_spatial_line_needs_an_absolute_pipe_directory_and_uids_that_are_numbers() {
        let text = format!("{HEADER}\n{A} spatial - - x\n{B} spatial relative/dir - x\n{A} spatial /p 12,x x\nnonsense\n");
        assert!(parse(&text).is_empty());
    }

    #[test]
    fn a_gpu_is_found_by_a_unique_prefix_of_its_uuid() {
        let entries = parse(&format!("{HEADER}\n{A} spatial /p/a - why\n{B} time-sliced - - why\n"));
        assert_eq!(find(&entries, A).map(|e| e.mode), Some(Mode::Spatial));
        assert_eq!(find(&entries, &A.to_uppercase()).map(|e| e.uuid.as_str()), Some(A));
        assert_eq!(find(&entries, "GPU-5e1cc0da-9a3b-4c12").map(|e| e.uuid.as_str()), Some(B));
        assert_eq!(find(&entries, "GPU-5e1cc0da"), None, "two GPUs start so");
        assert_eq!(find(&entries, "GPU-"), None);
        assert_eq!(find(&entries, "0"), None);
    }
}
