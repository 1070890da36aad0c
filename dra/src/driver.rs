//! Preparing and unpreparing claims: the work behind NodePrepareResources and
//! NodeUnprepareResources, in an order that a plugin killed at any point and started again
//! finishes without leaving a group or a CDI spec behind.

use crate::cdi::{self, ClaimDevice, Paths};
use crate::checkpoint::{ClaimEntry, PreparedDevice, Stage, Store};
use crate::claim;
use crate::controller::{Controller, Removal};
use crate::devices::Named;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::Api;
use tokio::sync::Mutex;

/// Set only by the tests (the "restart mid-prepare" test): the plugin exits right after making a
/// claim's group and before writing its CDI spec, as if killed there.
pub const ENV_EXIT_AFTER_GROUP: &str = "GPUSLICE_DRA_TEST_EXIT_AFTER_GROUP";

/// A claim as the kubelet names it.
#[derive(Debug, Clone)]
pub struct ClaimRef {
    pub namespace: String,
    pub uid: String,
    pub name: String,
}

pub struct Driver {
    pub name: String,
    pub node: String,
    pub devices: Vec<Named>,
    pub controller: Controller,
    pub cdi: Paths,
    /// NVIDIA's CDI kind, when the answer names NVIDIA's device as well (serve.rs).
    pub nvidia_cdi_kind: Option<String>,
    pub kube: kube::Client,
    pub store: Mutex<Store>,
}

impl Driver {
    /// Prepares one claim; the devices for the kubelet, or why not.
    pub async fn prepare(&self, c: &ClaimRef) -> Result<Vec<PreparedDevice>, String> {
        let mut store = self.store.lock().await;
        if let Some(e) = store.data.claims.get(&c.uid) {
            if e.stage == Stage::Prepared && cdi::spec_path(&self.cdi.spec_dir, &c.uid).exists() {
                tracing::info!("claim {}/{} ({}) is already prepared", c.namespace, c.name, c.uid);
                return Ok(e.devices.clone());
            }
        }
        let api: Api<ResourceClaim> = Api::namespaced(self.kube.clone(), &c.namespace);
        let rc = api.get(&c.name).await.map_err(|e| format!("reading claim {}/{}: {e}", c.namespace, c.name))?;
        let group = self.group_for(&store, c);
        let plan = claim::plan(&rc, &self.name, &self.node, &c.uid, &self.devices, group)?;
        self.check_room(&store, c, &plan)?;

        // First the intent, so that a restart knows a group may exist for this claim.
        let labels = claim::labels(&rc);
        let entry = ClaimEntry {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            group: plan.group.clone(),
            stage: Stage::Preparing,
            devices: vec![],
            labels: labels.clone(),
        };
        store.data.claims.insert(c.uid.clone(), entry);
        store.save()?;

        let controller = self.controller.clone();
        let (group, memory, sm, sm_max, priority) = (plan.group.clone(), plan.memory, plan.sm, plan.sm_max, plan.priority);
        let said = tokio::task::spawn_blocking(move || controller.set_group(&group, memory, sm, sm_max, priority))
            .await
            .map_err(|e| format!("controller call: {e}"))??;
        tracing::info!("claim {}/{} ({}): {said}", c.namespace, c.name, c.uid);
        self.label(&plan.group, labels).await;
        if std::env::var_os(ENV_EXIT_AFTER_GROUP).is_some() {
            tracing::warn!("{ENV_EXIT_AFTER_GROUP} is set: exiting between the group and the CDI spec");
            std::process::exit(3);
        }

        let cdi_devices: Vec<ClaimDevice> =
            plan.devices.iter().map(|d| ClaimDevice { name: format!("{}-{}", c.uid, d.device), uuid: d.uuid.clone() }).collect();
        let spec = cdi::spec(&self.cdi, &plan.group, &cdi_devices);
        cdi::write_atomically(&cdi::spec_path(&self.cdi.spec_dir, &c.uid), &spec)?;

        let prepared: Vec<PreparedDevice> = plan
            .devices
            .iter()
            .zip(&cdi_devices)
            .map(|(d, cd)| {
                let nvidia = self.nvidia_cdi_kind.as_ref().map(|kind| format!("{kind}={}", d.uuid));
                let cdi_ids = std::iter::once(cdi::device_id(&cd.name)).chain(nvidia).collect();
                PreparedDevice { requests: vec![d.request.clone()], pool: d.pool.clone(), device: d.device.clone(), cdi_ids, memory: plan.memory, sm: plan.sm }
            })
            .collect();
        let e = store.data.claims.get_mut(&c.uid).expect("inserted above");
        e.stage = Stage::Prepared;
        e.devices = prepared.clone();
        store.save()?;
        Ok(prepared)
    }

    /// Labels the group's metrics; a controller that cannot (an older one) costs the labels,
    /// not the claim.
    async fn label(&self, group: &str, labels: std::collections::BTreeMap<String, String>) {
        let controller = self.controller.clone();
        let g = group.to_string();
        match tokio::task::spawn_blocking(move || controller.label_group(&g, labels)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("group {group:?}: no claim labels on its metrics: {e}"),
            Err(e) => tracing::warn!("group {group:?}: no claim labels on its metrics: {e}"),
        }
    }

    /// Labels the groups of the claims the checkpoint holds again (a controller restarted
    /// meanwhile has lost them).
    pub async fn relabel(&self) {
        let entries: Vec<ClaimEntry> = self.store.lock().await.data.claims.values().filter(|e| e.stage == Stage::Prepared).cloned().collect();
        for e in entries {
            self.label(&e.group, e.labels).await;
        }
    }

    /// The scheduler keeps the slices on a device within it; this checks again on the node, so
    /// that allocations made without consumable capacity (or from a stale view) cannot
    /// overcommit a GPU: the claims prepared here plus this one must fit.
    fn check_room(&self, store: &Store, c: &ClaimRef, plan: &claim::Plan) -> Result<(), String> {
        for d in &plan.devices {
            let Some(dev) = self.devices.iter().find(|n| n.name == d.device) else { continue };
            let others: Vec<(&String, &PreparedDevice)> = store
                .data
                .claims
                .iter()
                .filter(|(uid, _)| **uid != c.uid)
                .flat_map(|(_, e)| e.devices.iter().filter(|p| p.device == d.device).map(move |p| (&e.name, p)))
                .collect();
            let memory: u64 = others.iter().map(|(_, p)| p.memory).sum();
            let sm: u32 = others.iter().map(|(_, p)| p.sm).sum();
            let names: Vec<&str> = others.iter().map(|(n, _)| n.as_str()).collect();
            if memory + plan.memory > dev.gpu.memory || sm + plan.sm > 100 {
                return Err(format!(
                    "claim {}/{} asks for {} and sm {} on {} ({}), where claims {} already hold {} of {} and sm {} of 100: refused",
                    c.namespace,
                    c.name,
                    crate::quantity::bytes(plan.memory),
                    plan.sm,
                    d.device,
                    dev.gpu.uuid,
                    names.join(", "),
                    crate::quantity::bytes(memory),
                    crate::quantity::bytes(dev.gpu.memory),
                    sm
                ));
            }
        }
        Ok(())
    }

    /// The claim's group: the one a checkpoint already names, else `<namespace>/<name>` unless
    /// another claim (an older one of the same name) holds it.
    fn group_for(&self, store: &Store, c: &ClaimRef) -> String {
        if let Some(e) = store.data.claims.get(&c.uid) {
            return e.group.clone();
        }
        let wanted = claim::group_name(&c.namespace, &c.name, &c.uid);
        if store.data.claims.values().any(|e| e.group == wanted) {
            format!("claim-{}", c.uid)
        } else {
            wanted
        }
    }

    /// Unprepares one claim: its group goes once its processes have, then its CDI spec and its
    /// checkpoint entry. A claim this plugin does not know is already unprepared.
    pub async fn unprepare(&self, c: &ClaimRef) -> Result<(), String> {
        let mut store = self.store.lock().await;
        let Some(entry) = store.data.claims.get(&c.uid).cloned() else {
            tracing::info!("claim {}/{} ({}): not prepared here; nothing to undo", c.namespace, c.name, c.uid);
            return Ok(());
        };
        let controller = self.controller.clone();
        let group = entry.group.clone();
        let removal = tokio::task::spawn_blocking(move || controller.remove_group(&group)).await.map_err(|e| format!("controller call: {e}"))??;
        if let Removal::Busy(why) = removal {
            // The kubelet calls again; the group must not go while a process still counts on it.
            return Err(format!("claim {}/{}: {why}; not unprepared yet", c.namespace, c.name));
        }
        cdi::remove(&self.cdi.spec_dir, &c.uid)?;
        store.data.claims.remove(&c.uid);
        store.save()?;
        tracing::info!("claim {}/{} ({}): unprepared, group {:?} {:?}", c.namespace, c.name, c.uid, entry.group, removal);
        Ok(())
    }
}
