//! gpuslice-dra against a test kubelet that speaks the kubelet's own protobuf over the real Unix
//! sockets, a small fake API server (ResourceSlices and ResourceClaims, the JSON the real one
//! serves), the gpuslice controller and processes under the simulated driver with two GPUs.
//!
//! What the tests leave in `<target>/dra/` (the published ResourceSlice, the CDI specs) is
//! validated by `make check-k8s` against the Kubernetes and CDI schemas.

use gpuslice_dra::proto::{dra_v1 as v1, dra_v1beta1 as v1beta1, registration as reg};
use gpuslice_integration::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

const DRIVER: &str = "gpuslice.dev";
const NODE: &str = "node-a";
const GPU_MEMORY: u64 = 80 * GIB;
const CLAIMS: &str = "/apis/resource.k8s.io/v1/namespaces";
const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

// ------------------------------------------------------------------------------ fake API server

/// Just enough of an API server: GET of stored objects (a `Status` 404 otherwise) and
/// server-side apply (PATCH with `application/apply-patch+yaml`), which stores the object.
struct FakeApi {
    url: String,
    objects: Arc<Mutex<HashMap<String, Value>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let objects: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (o, r) = (objects.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (o, r) = (o.clone(), r.clone());
                std::thread::spawn(move || serve(stream, &o, &r));
            }
        });
        FakeApi { url, objects, requests }
    }

    fn put(&self, path: &str, v: Value) {
        self.objects.lock().unwrap().insert(path.to_string(), v);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(stream: std::net::TcpStream, objects: &Mutex<HashMap<String, Value>>, requests: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let path = target.split('?').next().unwrap().to_string();
    let content_type = headers.get("content-type").cloned().unwrap_or_default();
    requests.lock().unwrap().push(format!("{method} {target} {content_type}"));
    let not_found = |what: &str| {
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
        )
    };
    let (code, answer) = match method.as_str() {
        "GET" => match objects.lock().unwrap().get(&path) {
            Some(v) => (200, v.clone()),
            None => not_found(&path),
        },
        "PATCH" if content_type == "application/apply-patch+yaml" => {
            let mut v: Value = serde_json::from_slice(&body).expect("apply body is JSON");
            v["metadata"]["resourceVersion"] = json!("1");
            v["metadata"]["uid"] = json!("5f1a1c3e-0000-4000-8000-000000000001");
            objects.lock().unwrap().insert(path, v.clone());
            (200, v)
        }
        _ => (405, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405})),
    };
    let text = answer.to_string();
    let mut s = stream;
    let _ = write!(s, "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
}

fn claim_path(ns: &str, name: &str) -> String {
    format!("{CLAIMS}/{ns}/resourceclaims/{name}")
}

/// An allocated ResourceClaim as the scheduler leaves it: one request `gpu` asking for
/// `memory` and `sm` of a device of class gpuslice.dev, allocated on `device` of this node.
fn allocated_claim(ns: &str, name: &str, uid: &str, device: &str, memory: &str, sm: &str, config: Option<Value>) -> Value {
    let mut allocation = json!({
        "devices": {
            "results": [{
                "request": "gpu", "driver": DRIVER, "pool": NODE, "device": device,
                "shareID": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
                "consumedCapacity": {"memory": memory, "sm": sm},
            }],
        },
    });
    if let Some(parameters) = config {
        allocation["devices"]["config"] = json!([{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": parameters}}]);
    }
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": DRIVER, "capacity": {"requests": {"memory": memory, "sm": sm}},
        }}]}},
        "status": {"allocation": allocation, "reservedFor": [{"resource": "pods", "name": format!("{name}-pod"), "uid": "4f2c8a1e-0000-4000-8000-0000000000aa"}]},
    })
}

// ---------------------------------------------------------------------------------- the node

/// Directories of one node: the kubelet's, the runtime's CDI directory.
struct Node<'s> {
    sim: &'s Sim,
    api: FakeApi,
    registry: PathBuf,
    plugin_dir: PathBuf,
    cdi_dir: PathBuf,
}

impl<'s> Node<'s> {
    fn new(sim: &'s Sim) -> Node<'s> {
        Node {
            sim,
            api: FakeApi::start(),
            registry: sim.path("kubelet/plugins_registry"),
            plugin_dir: sim.path("kubelet/plugins/gpuslice.dev"),
            cdi_dir: sim.path("cdi"),
        }
    }

    /// Starts the plugin for this node and waits until it serves the kubelet.
    fn plugin(&self, ctl: &Controller<'_>, env: &[(&str, &str)]) -> Running {
        let mut p = self
            .sim
            .program(workspace_binary("gpuslice-dra"))
            .env("GPUSLICE_LOG", "debug")
            .arg("--node-name")
            .arg(NODE)
            .arg("--api-server")
            .arg(&self.api.url)
            .arg("--registrar-dir")
            .arg(self.registry.display())
            .arg("--plugin-dir")
            .arg(self.plugin_dir.display())
            .arg("--cdi-dir")
            .arg(self.cdi_dir.display())
            .arg("--controller-socket")
            .arg(ctl.socket().display())
            .arg("--host-library")
            .arg(shim_path().display())
            .arg("--container-library")
            .arg("/opt/gpuslice/libgpuslice.so")
            .arg("--nvidia-cdi-kind")
            .arg("nvidia.com/gpu");
        for (k, v) in env {
            p = p.env(k, v);
        }
        let running = p.spawn();
        running.wait_for("the plugin to serve", Duration::from_secs(30), |l| l.starts_with("ready"));
        running
    }

    fn reg_socket(&self) -> PathBuf {
        self.registry.join("gpuslice.dev-reg.sock")
    }
}

async fn dial(path: &Path) -> Channel {
    let shown = path.display().to_string();
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap_or_else(|e| panic!("dialling {shown}: {e}"))
}

/// The kubelet's side: registration through the plugin watcher's socket, then DRA calls on the
/// endpoint the plugin named.
struct Kubelet {
    v1: v1::dra_plugin_client::DraPluginClient<Channel>,
    v1beta1: v1beta1::dra_plugin_client::DraPluginClient<Channel>,
}

impl Kubelet {
    async fn register(node: &Node<'_>) -> (Kubelet, reg::PluginInfo) {
        let mut r = reg::registration_client::RegistrationClient::new(dial(&node.reg_socket()).await);
        let info = r.get_info(reg::InfoRequest {}).await.expect("GetInfo").into_inner();
        r.notify_registration_status(reg::RegistrationStatus { plugin_registered: true, error: String::new() }).await.expect("NotifyRegistrationStatus");
        let channel = dial(Path::new(&info.endpoint)).await;
        let k =
            Kubelet { v1: v1::dra_plugin_client::DraPluginClient::new(channel.clone()), v1beta1: v1beta1::dra_plugin_client::DraPluginClient::new(channel) };
        (k, info)
    }

    async fn prepare(&mut self, ns: &str, name: &str, uid: &str) -> Result<v1::NodePrepareResourceResponse, tonic::Status> {
        let claims = vec![v1::Claim { namespace: ns.into(), uid: uid.into(), name: name.into() }];
        let mut answer = self.v1.node_prepare_resources(v1::NodePrepareResourcesRequest { claims }).await?.into_inner();
        Ok(answer.claims.remove(uid).unwrap_or_else(|| panic!("no answer for claim {uid}")))
    }

    async fn unprepare(&mut self, ns: &str, name: &str, uid: &str) -> String {
        let claims = vec![v1::Claim { namespace: ns.into(), uid: uid.into(), name: name.into() }];
        let mut answer = self.v1.node_unprepare_resources(v1::NodeUnprepareResourcesRequest { claims }).await.expect("NodeUnprepareResources").into_inner();
        answer.claims.remove(uid).unwrap_or_else(|| panic!("no answer for claim {uid}")).error
    }
}

// -------------------------------------------------------------------------------- CDI specs

/// The spec file in `dir` that defines CDI device `id` (`kind=name`), and the device's entry.
fn resolve_cdi(dir: &Path, id: &str) -> (PathBuf, Value, Value) {
    let (kind, name) = id.split_once('=').unwrap_or_else(|| panic!("{id:?} is not a CDI device id"));
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let spec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        if spec["kind"] != kind {
            continue;
        }
        if let Some(d) = spec["devices"].as_array().unwrap().iter().find(|d| d["name"] == name) {
            let d = d.clone();
            return (path, spec, d);
        }
    }
    panic!("no CDI spec in {} defines {id}", dir.display());
}

/// The environment a container gets from the device's edits, with each path turned back into
/// the node's path through the edits' own mounts (what the runtime's bind mounts do).
fn container_env(device: &Value) -> Vec<(String, String)> {
    let edits = &device["containerEdits"];
    let mounts: Vec<(String, String)> = edits["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["containerPath"].as_str().unwrap().to_string(), m["hostPath"].as_str().unwrap().to_string()))
        .collect();
    edits["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
            let v = mounts.iter().find(|(c, _)| v.starts_with(c.as_str())).map(|(c, h)| format!("{h}{}", &v[c.len()..])).unwrap_or_else(|| v.to_string());
            (k.to_string(), v)
        })
        .collect()
}

/// Where the tests leave what `make check-k8s` validates.
fn artefacts() -> PathBuf {
    let d = target_dir().join("dra");
    std::fs::create_dir_all(d.join("cdi")).unwrap();
    d
}

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_DEVICES", 2).env("SIMCUDA_MEM", GPU_MEMORY).env("SIMCUDA_CTX_RESERVE", 64 * MIB)
}

// ---------------------------------------------------------------------------------- the tests

/// The whole path of a claim: the plugin registers, publishes the node's two GPUs, prepares a
/// claim for "8 GiB and 30 %" of gpu-0 (v1) as group `default/trainer` with its limits and
/// priority, answers with a CDI id whose spec puts a process under the shim in that group (held
/// to 8 GiB, share 30), prepares it again idempotently, unprepares it only once the process is
/// gone, answers v1beta1 the same way, and takes an unknown claim's unprepare as done.
#[tokio::test(flavor = "current_thread")]
async fn a_test_kubelet_prepares_and_unprepares_slices() {
    let sim = sim();
    let ctl = sim.controller();
    let node = Node::new(&sim);
    let plugin = node.plugin(&ctl, &[]);

    // Registration as the kubelet's plugin watcher does it.
    let (mut kubelet, info) = Kubelet::register(&node).await;
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, DRIVER);
    assert_eq!(info.endpoint, node.plugin_dir.join("dra.sock").display().to_string());
    assert_eq!(info.supported_versions, ["v1.DRAPlugin", "v1beta1.DRAPlugin"]);

    // The ResourceSlice, field by field.
    let slice_path = format!("{SLICES}/{NODE}-gpuslice-dev");
    let slice = node.api.get(&slice_path).unwrap_or_else(|| panic!("no slice published; requests: {:?}", node.api.requests()));
    assert!(
        node.api
            .requests()
            .iter()
            .any(|r| r.starts_with(&format!("PATCH {slice_path}?")) && r.contains("fieldManager=gpuslice-dra") && r.ends_with("application/apply-patch+yaml")),
        "{:?}",
        node.api.requests()
    );
    std::fs::write(artefacts().join("resourceslice.json"), serde_json::to_vec_pretty(&slice).unwrap()).unwrap();
    assert_eq!(slice["apiVersion"], "resource.k8s.io/v1");
    assert_eq!(slice["kind"], "ResourceSlice");
    assert_eq!(slice["metadata"]["name"], format!("{NODE}-gpuslice-dev"));
    let spec = &slice["spec"];
    assert_eq!(spec["driver"], DRIVER);
    assert_eq!(spec["nodeName"], NODE);
    assert_eq!(spec["pool"], json!({"name": NODE, "generation": 1, "resourceSliceCount": 1}));
    let devices = spec["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{spec:#}");
    for (i, d) in devices.iter().enumerate() {
        let expected = json!({
            "name": format!("gpu-{i}"),
            "allowMultipleAllocations": true,
            "attributes": {
                "uuid": {"string": sim.device_uuid(i as u32)},
                "model": {"string": "gpuslice simulated GPU (sm_90, 132 SMs)"},
                "index": {"int": i},
                "type": {"string": "gpu"},
                "cudaComputeCapability": {"version": "9.0.0"},
                "driverVersion": {"version": "580.159.3"},
            },
            "capacity": {
                "memory": {"value": "80Gi", "requestPolicy": {"default": "80Gi", "validRange": {"min": "1Mi", "max": "80Gi", "step": "1Mi"}}},
                "sm": {"value": "100", "requestPolicy": {"default": "100", "validRange": {"min": "1", "max": "100", "step": "1"}}},
            },
        });
        assert_eq!(d, &expected, "device {i}");
    }
    assert_eq!(spec.as_object().unwrap().len(), 4, "driver, nodeName, pool, devices and nothing else: {spec:#}");

    // A claim for 8 GiB and 30 % of gpu-0, priority high by opaque config.
    let (ns, name, uid) = ("default", "trainer", "0b3a8f5e-7c1d-4e2a-9f6b-111111111111");
    let config = json!({"apiVersion": "gpuslice.dev/v1alpha1", "kind": "SliceConfig", "priority": "high"});
    node.api.put(&claim_path(ns, name), allocated_claim(ns, name, uid, "gpu-0", "8Gi", "30", Some(config)));
    let answer = kubelet.prepare(ns, name, uid).await.expect("NodePrepareResources");
    assert_eq!(answer.error, "");
    let cdi_id = format!("gpuslice.dev/claim={uid}-gpu-0");
    let nvidia_id = format!("nvidia.com/gpu={}", sim.device_uuid(0));
    assert_eq!(
        answer.devices,
        vec![v1::Device {
            request_names: vec!["gpu".into()],
            pool_name: NODE.into(),
            device_name: "gpu-0".into(),
            cdi_device_ids: vec![cdi_id.clone(), nvidia_id]
        }]
    );
    let group = "default/trainer";
    let l = ctl.ls();
    assert_eq!(l.group(group).unwrap()["priority"], "high", "{l}");
    let labels = json!({"claim_namespace": ns, "claim_name": name, "claim_uid": uid, "pod": "trainer-pod"});
    assert_eq!(l.group(group).unwrap()["labels"], labels, "the claim and pod label the group's metrics:\n{l}");

    // The CDI id resolves to a spec that puts a process in the claim's group under the shim.
    let (spec_file, cdi_spec, device) = resolve_cdi(&node.cdi_dir, &cdi_id);
    std::fs::copy(&spec_file, artefacts().join("cdi").join(spec_file.file_name().unwrap())).unwrap();
    assert_eq!(cdi_spec["cdiVersion"], "1.1.0");
    let env = container_env(&device);
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {k} in {env:?}"));
    assert_eq!(get("LD_PRELOAD"), shim_path().display().to_string());
    assert_eq!(get("GPUSLICE_SOCKET"), ctl.socket().display().to_string());
    assert_eq!(get("GPUSLICE_GROUP"), group);
    assert_eq!(get("NVIDIA_VISIBLE_DEVICES"), sim.device_uuid(0));
    let done = sim.path_str("done");
    let mut workload = sim.client(Route::Dlsym);
    for (k, v) in &env {
        workload = workload.env(k, v);
    }
    let w = workload.args(&format!("init ctx 0 info alloc 7G alloc 2G launch 20 100000 sync waitfile {done}")).spawn();
    let info = w.wait_line("info", 0);
    assert_eq!(kv(&info, "total").and_then(|t| t.parse::<u64>().ok()), Some(8 * GIB), "the process sees its claim's memory: `{info}`");
    assert!(line_ok(&w.wait_line("alloc", 0)));
    let refused = w.wait_line("alloc", 1);
    assert_eq!(line_code(&refused), Some(CUDA_ERROR_OUT_OF_MEMORY), "8 GiB claim, 7 GiB held, 2 GiB more: `{refused}`");
    let l = ctl.ls();
    assert_eq!(l.members(group), vec![w.pid()], "{l}");
    assert_eq!(l.process_group(w.pid()), group);
    assert_eq!(l.group_limit(group, 0), Some(8 * GIB), "{l}");
    assert_eq!(l.group_share(group, 0), Some(30), "the process runs under the claim's share:\n{l}");
    assert_eq!(l.group_used(group, 0), 64 * MIB + 7 * GIB, "its context and its 7 GiB count in the claim's group:\n{l}");
    // Its kernels go through the group's 30 % throttle: their device time is charged to the group
    // (only throttled launches are; sm_share.rs judges the share itself on the simulated clock).
    expect_ok(&w.wait_line("sync", 0));
    let (l, _) =
        ctl.ls_until("the group's throttled device time", Duration::from_secs(10), |l| l.group_device(group, 0)["charged_ns"].as_u64().unwrap_or(0) > 0);
    assert!(l.group_device(group, 0)["charged_ns"].as_u64().unwrap() >= 20 * 100_000 / 2, "20 kernels of 100 µs charged to the claim's group:\n{l}");

    // Prepared twice: the same answer, the same one group.
    let again = kubelet.prepare(ns, name, uid).await.expect("second NodePrepareResources");
    assert_eq!(again, answer);
    assert_eq!(ctl.ls().groups().iter().filter(|g| g["name"] == group).count(), 1);

    // Unprepare waits for the process to go.
    let busy = kubelet.unprepare(ns, name, uid).await;
    assert!(busy.contains("still has processes") && busy.contains(&w.pid().to_string()), "{busy}");
    assert!(spec_file.exists());
    std::fs::write(&done, "").unwrap();
    w.wait().assert_success();
    let (l, _) = ctl
        .ls_until("the workload to leave", Duration::from_secs(10), |l| l.group(group).is_some_and(|g| g["members"].as_array().is_some_and(|m| m.is_empty())));
    assert!(l.group(group).is_some());
    assert_eq!(kubelet.unprepare(ns, name, uid).await, "");
    assert!(ctl.ls().group(group).is_none(), "the claim's group is removed");
    assert!(!spec_file.exists(), "its CDI spec too");
    assert_eq!(kubelet.unprepare(ns, name, uid).await, "", "unprepared twice");

    // An unknown claim's unprepare is already done (the kubelet may ask after a restart).
    assert_eq!(kubelet.unprepare("default", "never-seen", "9d4c0e2a-0000-4000-8000-00000000abcd").await, "");

    // v1beta1: same messages, same work (gpu-1, the second GPU).
    let (ns2, name2, uid2) = ("team-b", "inference", "6a1e2f3d-5b4c-4d3e-8f2a-222222222222");
    node.api.put(&claim_path(ns2, name2), allocated_claim(ns2, name2, uid2, "gpu-1", "8Gi", "30", None));
    let claims = vec![v1beta1::Claim { namespace: ns2.into(), uid: uid2.into(), name: name2.into() }];
    let mut beta =
        kubelet.v1beta1.node_prepare_resources(v1beta1::NodePrepareResourcesRequest { claims: claims.clone() }).await.expect("v1beta1 prepare").into_inner();
    let b = beta.claims.remove(uid2).expect("answer for the v1beta1 claim");
    assert_eq!(b.error, "");
    assert_eq!(b.devices[0].device_name, "gpu-1");
    assert_eq!(b.devices[0].cdi_device_ids, vec![format!("gpuslice.dev/claim={uid2}-gpu-1"), format!("nvidia.com/gpu={}", sim.device_uuid(1))]);
    let (_, _, d) = resolve_cdi(&node.cdi_dir, &b.devices[0].cdi_device_ids[0]);
    assert!(container_env(&d).contains(&("NVIDIA_VISIBLE_DEVICES".into(), sim.device_uuid(1))));
    // The ledger numbers devices as processes first bring them (a workload that sees one GPU
    // brings one), so the claim's limits are checked on every device the ledger knows: a claim
    // is set device-wide, as the workload's CUDA_VISIBLE_DEVICES picks its GPU.
    let l = ctl.ls();
    let devices = l.group("team-b/inference").and_then(|g| g["devices"].as_array().cloned()).unwrap_or_default();
    assert!(!devices.is_empty(), "{l}");
    for d in &devices {
        assert_eq!((d["limit"].as_u64(), d["share"].as_u64()), (Some(8 * GIB), Some(30)), "{l}");
    }
    let mut un = kubelet.v1beta1.node_unprepare_resources(v1beta1::NodeUnprepareResourcesRequest { claims }).await.expect("v1beta1 unprepare").into_inner();
    assert_eq!(un.claims.remove(uid2).expect("answer").error, "");
    assert!(ctl.ls().group("team-b/inference").is_none());
    drop(plugin);
}

/// A claim whose consumed capacity is more than the device has is refused with the claim, the
/// device and both figures, and leaves no group and no CDI spec behind; so is a share over 100,
/// and a claim that does not fit next to the claims already prepared on its device.
#[tokio::test(flavor = "current_thread")]
async fn a_claim_over_the_device_is_refused() {
    let sim = sim();
    let ctl = sim.controller();
    let node = Node::new(&sim);
    let _plugin = node.plugin(&ctl, &[]);
    let (mut kubelet, _) = Kubelet::register(&node).await;
    let (ns, uid) = ("default", "1c0ffee0-0000-4000-8000-000000000096");
    node.api.put(&claim_path(ns, "huge"), allocated_claim(ns, "huge", uid, "gpu-0", "96Gi", "30", None));
    let a = kubelet.prepare(ns, "huge", uid).await.expect("a per-claim error, not a failed call");
    assert!(a.devices.is_empty());
    assert!(
        a.error.contains("claim default/huge asks for 96Gi of memory on gpu-0") && a.error.contains("which has 80Gi") && a.error.contains("refused"),
        "{}",
        a.error
    );
    let uid2 = "1c0ffee0-0000-4000-8000-000000000101";
    node.api.put(&claim_path(ns, "greedy"), allocated_claim(ns, "greedy", uid2, "gpu-1", "1Gi", "101", None));
    let a = kubelet.prepare(ns, "greedy", uid2).await.unwrap();
    assert!(a.error.contains("sm 101") && a.error.contains("1-100 percent"), "{}", a.error);
    // A claim the API server does not have (deleted meanwhile) is an error that says so.
    let a = kubelet.prepare(ns, "gone", "1c0ffee0-0000-4000-8000-000000000404").await.unwrap();
    assert!(a.error.contains("reading claim default/gone"), "{}", a.error);
    let l = ctl.ls();
    assert!(l.groups().is_empty(), "no group for refused claims:\n{l}");
    assert_eq!(std::fs::read_dir(&node.cdi_dir).map(|d| d.count()).unwrap_or(0), 0, "no CDI spec for refused claims");

    // Two claims that each fit but not together (allocated without consumable capacity, say):
    // the node refuses the second.
    let (a, b) = ("1c0ffee0-0000-4000-8000-0000000000aa", "1c0ffee0-0000-4000-8000-0000000000bb");
    node.api.put(&claim_path(ns, "first"), allocated_claim(ns, "first", a, "gpu-1", "48Gi", "50", None));
    node.api.put(&claim_path(ns, "second"), allocated_claim(ns, "second", b, "gpu-1", "48Gi", "40", None));
    assert_eq!(kubelet.prepare(ns, "first", a).await.unwrap().error, "");
    let e = kubelet.prepare(ns, "second", b).await.unwrap().error;
    assert!(e.contains("claim default/second asks for 48Gi and sm 40 on gpu-1") && e.contains("claims first already hold 48Gi of 80Gi"), "{e}");
    assert!(ctl.ls().group("default/second").is_none());
    assert_eq!(kubelet.unprepare(ns, "first", a).await, "");
    assert_eq!(kubelet.prepare(ns, "second", b).await.unwrap().error, "", "room again once the first is unprepared");
}

/// The plugin dies between making the claim's group and writing its CDI spec. The kubelet's
/// call fails; the started-again plugin finishes the prepare from its checkpoint (the same
/// group, one of it), and unprepares it cleanly.
#[tokio::test(flavor = "current_thread")]
async fn a_plugin_killed_mid_prepare_finishes_it_after_a_restart() {
    let sim = sim();
    let ctl = sim.controller();
    let node = Node::new(&sim);
    let (ns, name, uid) = ("default", "restarted", "3e9b1d7a-0000-4000-8000-00000000cafe");
    node.api.put(&claim_path(ns, name), allocated_claim(ns, name, uid, "gpu-1", "8Gi", "30", None));
    let dying = node.plugin(&ctl, &[("GPUSLICE_DRA_TEST_EXIT_AFTER_GROUP", "1")]);
    let (mut kubelet, _) = Kubelet::register(&node).await;
    assert!(kubelet.prepare(ns, name, uid).await.is_err(), "the call dies with the plugin");
    let out = dying.wait();
    assert_eq!(out.status.code(), Some(3), "{out}");
    let group = "default/restarted";
    assert!(ctl.ls().group(group).is_some(), "the group was made before the plugin died");
    assert_eq!(std::fs::read_dir(&node.cdi_dir).map(|d| d.count()).unwrap_or(0), 0, "but no CDI spec");
    let checkpoint: Value = serde_json::from_slice(&std::fs::read(node.plugin_dir.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(checkpoint["claims"][uid]["stage"], "preparing", "{checkpoint:#}");

    let _plugin = node.plugin(&ctl, &[]);
    let (mut kubelet, _) = Kubelet::register(&node).await;
    let a = kubelet.prepare(ns, name, uid).await.expect("prepare after the restart");
    assert_eq!(a.error, "");
    assert_eq!(a.devices[0].cdi_device_ids[0], format!("gpuslice.dev/claim={uid}-gpu-1"));
    resolve_cdi(&node.cdi_dir, &a.devices[0].cdi_device_ids[0]);
    assert_eq!(ctl.ls().groups().iter().filter(|g| g["name"] == group).count(), 1);
    let checkpoint: Value = serde_json::from_slice(&std::fs::read(node.plugin_dir.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(checkpoint["claims"][uid]["stage"], "prepared", "{checkpoint:#}");
    assert_eq!(kubelet.unprepare(ns, name, uid).await, "");
    assert!(ctl.ls().group(group).is_none());
}
