//! From an allocated ResourceClaim to what the node must do: which of this node's devices it got,
//! how much of each (the consumed capacity the scheduler recorded), and the claim's gpuslice
//! group with its limits and priority (opaque config).

use crate::devices::Named;
use crate::quantity;
use crate::slice::{MEMORY, SM};
use gpuslice_common::ledger::Priority;
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde::Deserialize;

/// A claim's devices on this node and the group that carries its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub group: String,
    pub memory: u64,
    pub sm: u32,
    pub priority: Option<Priority>,
    pub devices: Vec<PlannedDevice>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedDevice {
    pub request: String,
    pub pool: String,
    pub device: String,
    pub uuid: String,
}

/// The opaque configuration a claim (or its class) may give the driver.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SliceConfig {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    /// high, normal or low.
    #[serde(default)]
    pub priority: Option<String>,
}

pub const CONFIG_API_VERSION: &str = "gpuslice.dev/v1alpha1";
pub const CONFIG_KIND: &str = "SliceConfig";

/// The gpuslice group of a claim: `<namespace>/<name>` where that is a valid group name (so that
/// `gpuslice ls` and the metrics name the claim), otherwise `claim-<uid>`.
pub fn group_name(namespace: &str, name: &str, uid: &str) -> String {
    let readable = format!("{namespace}/{name}");
    if gpuslice_common::settings::check_group_name(&readable).is_ok() {
        readable
    } else {
        format!("claim-{uid}")
    }
}

/// The metric labels of the claim's group: its namespace, name, uid and the pods it is reserved
/// for (comma-separated; usually one).
pub fn labels(claim: &ResourceClaim) -> std::collections::BTreeMap<String, String> {
    let m = &claim.metadata;
    let pods: Vec<&str> = claim.status.iter().flat_map(|s| s.reserved_for.iter().flatten()).filter(|r| r.resource == "pods").map(|r| r.name.as_str()).collect();
    let mut out = std::collections::BTreeMap::new();
    out.insert("claim_namespace".to_string(), m.namespace.clone().unwrap_or_default());
    out.insert("claim_name".to_string(), m.name.clone().unwrap_or_default());
    out.insert("claim_uid".to_string(), m.uid.clone().unwrap_or_default());
    let mut pod = pods.join(",");
    pod.truncate(gpuslice_common::protocol::MAX_LABEL_VALUE);
    out.insert("pod".to_string(), pod);
    out
}

/// What preparing `claim` on `node` means, or why it cannot be prepared (with the claim, the
/// device and the figures in the message).
pub fn plan(claim: &ResourceClaim, driver: &str, node: &str, uid: &str, devices: &[Named], group: String) -> Result<Plan, String> {
    let ns = claim.metadata.namespace.as_deref().unwrap_or("");
    let name = claim.metadata.name.as_deref().unwrap_or("");
    let who = format!("claim {ns}/{name}");
    let actual_uid = claim.metadata.uid.as_deref().unwrap_or("");
    if actual_uid != uid {
        return Err(format!("{who} has uid {actual_uid:?}, but the kubelet asked for uid {uid:?} (deleted and made again?)"));
    }
    let allocation = claim.status.as_ref().and_then(|s| s.allocation.as_ref()).and_then(|a| a.devices.as_ref());
    let Some(allocation) = allocation else { return Err(format!("{who} is not allocated")) };
    let ours: Vec<_> = allocation.results.iter().flatten().filter(|r| r.driver == driver).collect();
    if ours.is_empty() {
        return Err(format!("{who} has no device of driver {driver}"));
    }
    let mut planned = Vec::new();
    let mut limits: Option<(u64, u32)> = None;
    for r in &ours {
        if r.pool != node {
            return Err(format!("{who}: device {}/{} is in pool {:?}, not this node's ({node})", r.pool, r.device, r.pool));
        }
        let Some(d) = devices.iter().find(|d| d.name == r.device) else {
            return Err(format!("{who}: this node ({node}) has no device {:?}", r.device));
        };
        let consumed = |key: &str| r.consumed_capacity.as_ref().and_then(|c| c.get(key)).map(|q| quantity::parse(&q.0)).transpose();
        let memory = consumed(MEMORY).map_err(|e| format!("{who}: {e}"))?.unwrap_or(d.gpu.memory);
        let sm = consumed(SM).map_err(|e| format!("{who}: {e}"))?.unwrap_or(100);
        if memory == 0 || memory > d.gpu.memory {
            return Err(format!(
                "{who} asks for {} of memory on {} ({}), which has {}: refused",
                quantity::bytes(memory),
                d.name,
                d.gpu.uuid,
                quantity::bytes(d.gpu.memory)
            ));
        }
        if sm == 0 || sm > 100 {
            return Err(format!("{who} asks for sm {sm} on {} ({}): a share is 1-100 percent of the device's time; refused", d.name, d.gpu.uuid));
        }
        let these = (memory, sm as u32);
        if limits.is_some_and(|l| l != these) {
            return Err(format!("{who} has different slices on its devices; gpuslice gives one claim the same memory and sm on each of its GPUs"));
        }
        limits = Some(these);
        planned.push(PlannedDevice { request: r.request.clone(), pool: r.pool.clone(), device: r.device.clone(), uuid: d.gpu.uuid.clone() });
    }
    let (memory, sm) = limits.expect("at least one device");
    let mut priority = None;
    for c in allocation.config.iter().flatten() {
        let Some(opaque) = c.opaque.as_ref().filter(|o| o.driver == driver) else { continue };
        let applies = c.requests.as_ref().is_none_or(|rs| rs.is_empty() || ours.iter().any(|r| rs.contains(&r.request)));
        if !applies {
            continue;
        }
        let config: SliceConfig = serde_json::from_value(opaque.parameters.0.clone()).map_err(|e| format!("{who}: opaque config for {driver}: {e}"))?;
        if config.api_version.as_deref().is_some_and(|v| v != CONFIG_API_VERSION) || config.kind.as_deref().is_some_and(|k| k != CONFIG_KIND) {
            return Err(format!("{who}: opaque config for {driver} must be apiVersion {CONFIG_API_VERSION}, kind {CONFIG_KIND}"));
        }
        // Later entries win: the claim's own config comes after its class's.
        if let Some(p) = config.priority {
            priority = Some(p.parse::<Priority>().map_err(|e| format!("{who}: opaque config: {e}"))?);
        }
    }
    Ok(Plan { group, memory, sm, priority, devices: planned })
}
