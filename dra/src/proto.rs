//! The kubelet's gRPC APIs, generated at build time from proto/ (the kubelet's own files).

/// `pluginregistration.Registration`: how the kubelet's plugin watcher learns about us.
pub mod registration {
    tonic::include_proto!("pluginregistration");
}

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin` (Kubernetes 1.34+).
pub mod dra_v1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
}

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin` (Kubernetes 1.32-1.33; same messages as v1).
pub mod dra_v1beta1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
}
