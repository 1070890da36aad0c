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
    /// Issue 18: the cap over the `sm` guarantee (`smMax` in the opaque config; 100 = none);
    /// `None`: the guarantee is the cap.
    pub sm_max: Option<u32>,
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
    /// Issue 18: the most the claim's group may get when neighbours leave the device idle: a
    /// percentage, or `none`. The consumed `sm` capacity stays its guarantee.
    #[serde(default)]
    pub sm_max: Option<serde_json::Value>,
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
    let mut sm_max = None;
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
        if let Some(cap) = config.sm_max {
            // `60`, `"60%"` or `"none"`.
            let text = cap.as_str().map_or_else(|| cap.to_string(), str::to_string);
            let cap = gpuslice_common::settings::parse_cap(&text).map_err(|e| format!("{who}: opaque config: smMax {text:?}: {e}"))?;
            if cap < sm {
                return Err(format!("{who}: opaque config: smMax {cap} is below the claim's sm {sm}: the cap must be at least the guarantee"));
            }
            sm_max = Some(cap);
        }
    }
    Ok(Plan { group, memory, sm, sm_max, priority, devices: planned })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{Gpu, Named};
    use serde_json::json;

    fn devices() -> Vec<Named> {
        (0..2)
            .map(|i| Named {
                name: format!("gpu-{i}"),
                gpu: Gpu {
                    uuid: format!("GPU-{i}"),
                    index: i,
                    model: "H200".into(),
                    memory: 141 << 30,
                    compute_capability: Some((9, 0)),
                    driver_version: None,
                    parent: None,
                },
            })
            .collect()
    }

    fn claim(results: serde_json::Value, config: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"namespace": "ns", "name": "c", "uid": "u1"},
            "spec": {},
            "status": {"allocation": {"devices": {"results": results, "config": config}}},
        }))
        .unwrap()
    }

    fn result(device: &str, memory: &str, sm: &str) -> serde_json::Value {
        json!({"request": "gpu", "driver": "gpuslice.dev", "pool": "n", "device": device, "consumedCapacity": {"memory": memory, "sm": sm}})
    }

    fn opaque(parameters: serde_json::Value) -> serde_json::Value {
        json!([{"source": "FromClass", "opaque": {"driver": "gpuslice.dev", "parameters": {"priority": "low"}}}, {"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": "gpuslice.dev", "parameters": parameters}}])
    }

    #[test]
    fn a_claim_becomes_its_devices_limits_and_priority() {
        let c = claim(json!([result("gpu-1", "8Gi", "30")]), opaque(json!({"priority": "high"})));
        let p = plan(&c, "gpuslice.dev", "n", "u1", &devices(), "ns/c".into()).unwrap();
        assert_eq!((p.memory, p.sm, p.priority), (8 << 30, 30, Some(Priority::High)), "the claim's config comes after its class's");
        assert_eq!(p.sm_max, None, "no smMax: the guarantee is the cap");
        let lends = claim(json!([result("gpu-1", "8Gi", "30")]), opaque(json!({"smMax": "none"})));
        assert_eq!(plan(&lends, "gpuslice.dev", "n", "u1", &devices(), "ns/c".into()).unwrap().sm_max, Some(100), "issue 18: smMax none");
        let capped = claim(json!([result("gpu-1", "8Gi", "30")]), opaque(json!({"smMax": 60})));
        assert_eq!(plan(&capped, "gpuslice.dev", "n", "u1", &devices(), "ns/c".into()).unwrap().sm_max, Some(60));
        let below = claim(json!([result("gpu-1", "8Gi", "30")]), opaque(json!({"smMax": "20%"})));
        assert!(plan(&below, "gpuslice.dev", "n", "u1", &devices(), "ns/c".into()).unwrap_err().contains("at least the guarantee"));
        assert_eq!(p.devices, vec![PlannedDevice { request: "gpu".into(), pool: "n".into(), device: "gpu-1".into(), uuid: "GPU-1".into() }]);
    }

    #[test]
    fn what_cannot_be_prepared_says_why() {
        let d = devices();
        let ok = |c: &ResourceClaim, uid: &str| plan(c, "gpuslice.dev", "n", uid, &d, "g".into());
        let one = claim(json!([result("gpu-0", "8Gi", "30")]), json!([]));
        assert!(ok(&one, "u2").unwrap_err().contains("has uid \"u1\""));
        let other_node = claim(json!([{"request": "gpu", "driver": "gpuslice.dev", "pool": "m", "device": "gpu-0"}]), json!([]));
        assert!(ok(&other_node, "u1").unwrap_err().contains("not this node's"));
        let missing = claim(json!([result("gpu-7", "8Gi", "30")]), json!([]));
        assert!(ok(&missing, "u1").unwrap_err().contains("has no device \"gpu-7\""));
        let uneven = claim(json!([result("gpu-0", "8Gi", "30"), result("gpu-1", "4Gi", "30")]), json!([]));
        assert!(ok(&uneven, "u1").unwrap_err().contains("different slices"));
        let bad_config = claim(json!([result("gpu-0", "8Gi", "30")]), opaque(json!({"priority": "high", "smCap": 50})));
        assert!(ok(&bad_config, "u1").unwrap_err().contains("unknown field `smCap`"));
        let bad_kind = claim(json!([result("gpu-0", "8Gi", "30")]), opaque(json!({"apiVersion": "gpuslice.dev/v1alpha1", "kind": "Other"})));
        assert!(ok(&bad_kind, "u1").unwrap_err().contains("kind SliceConfig"));
        let fraction = claim(json!([result("gpu-0", "0.5Gi", "30")]), json!([]));
        assert!(ok(&fraction, "u1").unwrap_err().contains("quantity \"0.5Gi\": expected a whole number"));
    }

    #[test]
    fn a_claim_without_consumed_capacity_gets_the_whole_device() {
        let c = claim(json!([{"request": "gpu", "driver": "gpuslice.dev", "pool": "n", "device": "gpu-0"}]), json!([]));
        let p = plan(&c, "gpuslice.dev", "n", "u1", &devices(), "g".into()).unwrap();
        assert_eq!((p.memory, p.sm, p.priority), (141 << 30, 100, None));
    }

    #[test]
    fn group_names_follow_the_claim_while_they_fit() {
        assert_eq!(group_name("default", "trainer", "u"), "default/trainer");
        let long = "x".repeat(70);
        assert_eq!(group_name("default", &long, "0b3a"), "claim-0b3a");
    }
}
