//! The gpuslice controller as the plugin uses it: a group per claim, made, limited and removed
//! over the controller's Unix socket (common/src/protocol.rs).

use gpuslice_common::ledger::Priority;
use gpuslice_common::protocol::{call, Edit, FrameError, GroupLabels, Limit, Request, Response, Target};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Controller {
    pub socket: PathBuf,
}

/// What removing a group came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// There was no such group (already removed).
    Absent,
    /// Its processes have not all exited yet.
    Busy(String),
}

impl Controller {
    fn ask(&self, request: &Request) -> Result<String, String> {
        match call(&self.socket, request, TIMEOUT) {
            Ok((Response::Done { message }, _)) => Ok(message),
            Ok((Response::Error { message }, _)) => Err(message),
            Ok((other, _)) => Err(format!("unexpected answer from the controller: {other:?}")),
            Err(FrameError::Io(e)) => Err(format!("no gpuslice controller at {} ({e})", self.socket.display())),
            Err(e) => Err(format!("talking to the controller at {}: {e}", self.socket.display())),
        }
    }

    /// Creates `group` (or updates it: a repeated prepare sets the same limits again).
    pub fn set_group(&self, group: &str, memory: u64, sm: u32, sm_max: Option<u32>, priority: Option<Priority>) -> Result<String, String> {
        let edit =
            Edit { target: Target::Group(group.to_string()), memory: Some(Limit::Bytes(memory)), sm: Some(sm), sm_max, priority, device: None, create: true };
        self.ask(&Request::Set(edit))
    }

    /// Labels `group`'s metrics with the claim and pod it serves.
    pub fn label_group(&self, group: &str, labels: BTreeMap<String, String>) -> Result<String, String> {
        self.ask(&Request::LabelGroup(GroupLabels { group: group.to_string(), labels }))
    }

    /// Removes `group` once it has no member. Whether it exists and who is in it comes from the
    /// listing, not from the wording of a refusal.
    pub fn remove_group(&self, group: &str) -> Result<Removal, String> {
        let listing = match call(&self.socket, &Request::List, TIMEOUT) {
            Ok((Response::Listing(l), _)) => l,
            Ok((Response::Error { message }, _)) => return Err(message),
            Ok((other, _)) => return Err(format!("unexpected answer from the controller: {other:?}")),
            Err(e) => return Err(format!("talking to the controller at {}: {e}", self.socket.display())),
        };
        let Some(row) = listing.groups.iter().find(|g| g.name == group) else { return Ok(Removal::Absent) };
        if !row.members.is_empty() {
            let pids: Vec<String> = row.members.iter().map(u32::to_string).collect();
            return Ok(Removal::Busy(format!("group {group:?} still has processes (pid {})", pids.join(", "))));
        }
        self.ask(&Request::RemoveGroup(group.to_string())).map(|_| Removal::Removed)
    }
}
