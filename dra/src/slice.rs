//! The node's ResourceSlice (`resource.k8s.io/v1`): one per node and pool, each GPU a device with
//! consumable capacity `memory` (bytes, in MiB steps) and `sm` (percent of its time), so that the
//! scheduler itself keeps the slices it grants on a GPU within what the GPU has.

use crate::devices::Named;
use crate::quantity;
use k8s_openapi::api::resource::v1::{
    CapacityRequestPolicy, CapacityRequestPolicyRange, Device, DeviceAttribute, DeviceCapacity, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use std::collections::BTreeMap;

/// The capacity names a claim asks for (`capacity.requests`) and the allocation result reports.
pub const MEMORY: &str = "memory";
pub const SM: &str = "sm";
/// The granularity of memory slices: the scheduler rounds a request up to it.
pub const MEMORY_STEP: u64 = 1 << 20;

/// The slice's object name: one per node and driver (its pool is the node).
pub fn slice_name(node: &str, driver: &str) -> String {
    format!("{node}-{}", driver.replace('.', "-"))
}

fn string(s: impl Into<String>) -> DeviceAttribute {
    DeviceAttribute { string: Some(s.into()), ..Default::default() }
}

fn int(i: i64) -> DeviceAttribute {
    DeviceAttribute { int: Some(i), ..Default::default() }
}

fn version(v: String) -> DeviceAttribute {
    DeviceAttribute { version: Some(v), ..Default::default() }
}

/// A driver version such as "580.159.03" as the semantic version attributes need ("580.159.3");
/// `None` when it is not three numbers.
pub fn semver(v: &str) -> Option<String> {
    let parts: Vec<u64> = v.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    match parts.as_slice() {
        [a, b] => Some(format!("{a}.{b}.0")),
        [a, b, c] => Some(format!("{a}.{b}.{c}")),
        _ => None,
    }
}

/// The slice's device for one GPU or MIG instance.
pub fn device(d: &Named) -> Device {
    let g = &d.gpu;
    let mut attributes = BTreeMap::new();
    attributes.insert("uuid".to_string(), string(&g.uuid));
    attributes.insert("model".to_string(), string(&g.model));
    attributes.insert("index".to_string(), int(i64::from(g.index)));
    attributes.insert("type".to_string(), string(if g.parent.is_some() { "mig" } else { "gpu" }));
    if let Some(parent) = &g.parent {
        attributes.insert("parentUUID".to_string(), string(parent));
    }
    if let Some((major, minor)) = g.compute_capability {
        attributes.insert("cudaComputeCapability".to_string(), version(format!("{major}.{minor}.0")));
    }
    if let Some(v) = g.driver_version.as_deref().and_then(semver) {
        attributes.insert("driverVersion".to_string(), version(v));
    }
    let memory = g.memory - g.memory % MEMORY_STEP;
    let mut capacity = BTreeMap::new();
    capacity.insert(
        MEMORY.to_string(),
        DeviceCapacity {
            value: Quantity(quantity::bytes(memory)),
            // A claim that names no memory gets the whole device's.
            request_policy: Some(CapacityRequestPolicy {
                default: Some(Quantity(quantity::bytes(memory))),
                valid_range: Some(CapacityRequestPolicyRange {
                    min: Quantity(quantity::bytes(MEMORY_STEP)),
                    max: Some(Quantity(quantity::bytes(memory))),
                    step: Some(Quantity(quantity::bytes(MEMORY_STEP))),
                }),
                valid_values: None,
            }),
        },
    );
    capacity.insert(
        SM.to_string(),
        DeviceCapacity {
            value: Quantity("100".into()),
            request_policy: Some(CapacityRequestPolicy {
                default: Some(Quantity("100".into())),
                valid_range: Some(CapacityRequestPolicyRange {
                    min: Quantity("1".into()),
                    max: Some(Quantity("100".into())),
                    step: Some(Quantity("1".into())),
                }),
                valid_values: None,
            }),
        },
    );
    Device { name: d.name.clone(), attributes: Some(attributes), capacity: Some(capacity), allow_multiple_allocations: Some(true), ..Default::default() }
}

/// The whole slice for `node`, at pool generation `generation`.
pub fn build(driver: &str, node: &str, devices: &[Named], generation: i64) -> ResourceSlice {
    ResourceSlice {
        metadata: ObjectMeta { name: Some(slice_name(node, driver)), ..Default::default() },
        spec: ResourceSliceSpec {
            driver: driver.to_string(),
            node_name: Some(node.to_string()),
            pool: ResourcePool { name: node.to_string(), generation, resource_slice_count: 1 },
            devices: Some(devices.iter().map(device).collect()),
            ..Default::default()
        },
    }
}

/// Makes the API server's slice for this node say `devices`: created at generation 1, or applied
/// again with the next generation when the devices changed, or left alone when they did not.
pub async fn publish(client: kube::Client, driver: &str, node: &str, devices: &[Named]) -> Result<ResourceSlice, String> {
    let api: Api<ResourceSlice> = Api::all(client);
    let name = slice_name(node, driver);
    let existing = api.get_opt(&name).await.map_err(|e| format!("reading ResourceSlice {name}: {e}"))?;
    let wanted = build(driver, node, devices, 1);
    let generation = match &existing {
        Some(old) if old.spec.devices == wanted.spec.devices && old.spec.node_name == wanted.spec.node_name => return Ok(old.clone()),
        Some(old) => old.spec.pool.generation + 1,
        None => 1,
    };
    let slice = build(driver, node, devices, generation);
    let params = PatchParams::apply("gpuslice-dra").force();
    api.patch(&name, &params, &Patch::Apply(&slice)).await.map_err(|e| format!("publishing ResourceSlice {name}: {e}"))
}
