//! `gpuslice-dra`'s run: find the GPUs, publish the node's ResourceSlice, then answer the
//! kubelet on the DRA socket and, once that listens, on the registration socket.

use crate::cdi::Paths;
use crate::checkpoint::Store;
use crate::controller::Controller;
use crate::driver::Driver;
use crate::grpc::{DraV1, DraV1beta1, Registration};
use crate::proto::{dra_v1, dra_v1beta1, registration};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "gpuslice-dra", version, about = "Kubernetes DRA kubelet plugin for gpuslice: hands out GPU slices (memory and SM share) as ResourceClaims")]
pub struct Args {
    /// The DRA driver name (DeviceClasses select it).
    #[arg(long, default_value = "gpuslice.dev")]
    pub driver_name: String,
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where the kubelet's plugin watcher looks for registration sockets.
    #[arg(long, default_value = "/var/lib/kubelet/plugins_registry")]
    pub registrar_dir: PathBuf,
    /// This plugin's directory: its DRA socket and checkpoint (default /var/lib/kubelet/plugins/<driver>).
    #[arg(long)]
    pub plugin_dir: Option<PathBuf>,
    /// The CDI spec directory the container runtime reads.
    #[arg(long, default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,
    /// The gpuslice controller's socket on the node.
    #[arg(long, env = "GPUSLICE_SOCKET", default_value = gpuslice_common::protocol::DEFAULT_SOCKET)]
    pub controller_socket: PathBuf,
    /// Where the socket's directory appears inside workload containers.
    #[arg(long, default_value = "/run/gpuslice")]
    pub container_socket_dir: PathBuf,
    /// libgpuslice.so on the node (the DaemonSet's init container puts it there).
    #[arg(long, default_value = "/opt/gpuslice/libgpuslice.so")]
    pub host_library: PathBuf,
    /// Where workload containers see it (LD_PRELOAD names this path).
    #[arg(long, default_value = "/opt/gpuslice/libgpuslice.so")]
    pub container_library: PathBuf,
    /// NVML's library.
    #[arg(long, default_value = "libnvidia-ml.so.1")]
    pub nvml_library: String,
    /// Also answer each device with `<kind>=<GPU UUID>`, the CDI device of NVIDIA's own specs
    /// (`nvidia.com/gpu`, from `nvidia-ctk cdi generate` or the GPU Operator), which gives the
    /// container the GPU itself. Without it, the spec's NVIDIA_VISIBLE_DEVICES asks NVIDIA's
    /// runtime for it.
    #[arg(long)]
    pub nvidia_cdi_kind: Option<String>,
    /// The API server's URL; by default the in-cluster service account (or a kubeconfig).
    #[arg(long)]
    pub api_server: Option<String>,
}

impl Args {
    fn plugin_dir(&self) -> PathBuf {
        self.plugin_dir.clone().unwrap_or_else(|| Path::new("/var/lib/kubelet/plugins").join(&self.driver_name))
    }
}

/// A socket path free for `bind`: a stale socket from an earlier run is removed.
fn listen(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing the old {}: {e}", path.display())),
    }
    UnixListener::bind(path).map_err(|e| format!("listening on {}: {e}", path.display()))
}

async fn kube_client(api_server: Option<&str>) -> Result<kube::Client, String> {
    let config = match api_server {
        Some(url) => kube::Config::new(url.parse().map_err(|e| format!("--api-server {url}: {e}"))?),
        None => kube::Config::infer().await.map_err(|e| format!("finding the API server (in-cluster or kubeconfig): {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("API client: {e}"))
}

pub async fn run(args: Args) -> Result<(), String> {
    let devices = crate::devices::discover(&args.nvml_library)?;
    for d in &devices {
        tracing::info!("{}: {} {} ({} bytes)", d.name, d.gpu.uuid, d.gpu.model, d.gpu.memory);
    }
    let kube = kube_client(args.api_server.as_deref()).await?;
    let slice = crate::slice::publish(kube.clone(), &args.driver_name, &args.node_name, &devices).await?;
    tracing::info!(
        "ResourceSlice {} published (pool {}, generation {})",
        slice.metadata.name.unwrap_or_default(),
        slice.spec.pool.name,
        slice.spec.pool.generation
    );

    let plugin_dir = args.plugin_dir();
    let store = Store::open(&plugin_dir.join("checkpoint.json"))?;
    let socket_dir = args.controller_socket.parent().unwrap_or(Path::new("/")).to_path_buf();
    let socket_name = args.controller_socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "gpuslice.sock".into());
    let driver = Arc::new(Driver {
        name: args.driver_name.clone(),
        node: args.node_name.clone(),
        devices,
        controller: Controller { socket: args.controller_socket.clone() },
        cdi: Paths {
            spec_dir: args.cdi_dir.clone(),
            host_library: args.host_library.clone(),
            container_library: args.container_library.clone(),
            host_socket_dir: socket_dir,
            container_socket_dir: args.container_socket_dir.clone(),
            socket_name,
        },
        nvidia_cdi_kind: args.nvidia_cdi_kind.clone(),
        kube,
        store: tokio::sync::Mutex::new(store),
    });

    driver.relabel().await;
    let dra_socket = plugin_dir.join("dra.sock");
    let reg_socket = args.registrar_dir.join(format!("{}-reg.sock", args.driver_name));
    let dra_listener = listen(&dra_socket)?;
    let v1 = DraV1(driver);
    let dra = tonic::transport::Server::builder()
        .add_service(dra_v1::dra_plugin_server::DraPluginServer::new(v1.clone()))
        .add_service(dra_v1beta1::dra_plugin_server::DraPluginServer::new(DraV1beta1(v1)))
        .serve_with_incoming(UnixListenerStream::new(dra_listener));
    // Registration last: the kubelet dials the DRA socket as soon as it sees this one.
    let reg_listener = listen(&reg_socket)?;
    let registration = Registration { driver: args.driver_name.clone(), endpoint: dra_socket.display().to_string() };
    let reg = tonic::transport::Server::builder()
        .add_service(registration::registration_server::RegistrationServer::new(registration))
        .serve_with_incoming(UnixListenerStream::new(reg_listener));
    tracing::info!("serving the kubelet: {} and {}", reg_socket.display(), dra_socket.display());
    println!("ready registration={} dra={}", reg_socket.display(), dra_socket.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let outcome = tokio::select! {
        r = dra => r.map_err(|e| format!("DRA socket: {e}")),
        r = reg => r.map_err(|e| format!("registration socket: {e}")),
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    // Gone from the plugin watcher's directory, so that the kubelet stops dialling us.
    let _ = std::fs::remove_file(&reg_socket);
    let _ = std::fs::remove_file(&dra_socket);
    outcome
}
