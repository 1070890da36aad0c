//! gpuslice's DRA kubelet plugin (`gpuslice-dra`): Kubernetes hands out slices of a GPU (memory
//! and a share of its time) as ResourceClaims, and each prepared claim is a gpuslice group.
//! A library as well as a binary so that the tests' kubelet speaks the very same protobuf.

pub mod cdi;
pub mod checkpoint;
pub mod claim;
pub mod controller;
pub mod devices;
pub mod driver;
pub mod grpc;
pub mod proto;
pub mod quantity;
pub mod serve;
pub mod slice;
