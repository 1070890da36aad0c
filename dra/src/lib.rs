//! gpuslice's DRA kubelet plugin as a library, so that the test kubelet speaks the same protobuf.
pub mod proto;
