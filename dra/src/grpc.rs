//! The kubelet's two gRPC services: plugin registration (GetInfo, NotifyRegistrationStatus) and
//! DRAPlugin in v1 and v1beta1 (the same messages; v1beta1 is answered by the v1 code).

use crate::driver::{ClaimRef, Driver};
use crate::proto::{dra_v1 as v1, dra_v1beta1 as v1beta1, registration as reg};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The versions of the DRAPlugin service the kubelet may pick from (kubelet's DRAPluginService).
pub const SUPPORTED_VERSIONS: [&str; 2] = ["v1.DRAPlugin", "v1beta1.DRAPlugin"];

pub struct Registration {
    pub driver: String,
    /// The DRA socket's path, as the kubelet should dial it.
    pub endpoint: String,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Registration {
    async fn get_info(&self, _: Request<reg::InfoRequest>) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: "DRAPlugin".into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(&self, r: Request<reg::RegistrationStatus>) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let s = r.into_inner();
        if s.plugin_registered {
            tracing::info!("the kubelet registered driver {}", self.driver);
        } else {
            tracing::error!("the kubelet refused to register driver {}: {}", self.driver, s.error);
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

fn claim_ref(c: &v1::Claim) -> ClaimRef {
    ClaimRef { namespace: c.namespace.clone(), uid: c.uid.clone(), name: c.name.clone() }
}

#[derive(Clone)]
pub struct DraV1(pub Arc<Driver>);

#[tonic::async_trait]
impl v1::dra_plugin_server::DraPlugin for DraV1 {
    async fn node_prepare_resources(&self, r: Request<v1::NodePrepareResourcesRequest>) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        let mut claims = HashMap::new();
        for c in r.into_inner().claims {
            let answer = match self.0.prepare(&claim_ref(&c)).await {
                Ok(devices) => v1::NodePrepareResourceResponse {
                    devices: devices
                        .into_iter()
                        .map(|d| v1::Device { request_names: d.requests, pool_name: d.pool, device_name: d.device, cdi_device_ids: d.cdi_ids })
                        .collect(),
                    error: String::new(),
                },
                Err(error) => {
                    tracing::error!("prepare {}/{} ({}): {error}", c.namespace, c.name, c.uid);
                    v1::NodePrepareResourceResponse { devices: vec![], error }
                }
            };
            claims.insert(c.uid, answer);
        }
        Ok(Response::new(v1::NodePrepareResourcesResponse { claims }))
    }

    async fn node_unprepare_resources(&self, r: Request<v1::NodeUnprepareResourcesRequest>) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        let mut claims = HashMap::new();
        for c in r.into_inner().claims {
            let error = match self.0.unprepare(&claim_ref(&c)).await {
                Ok(()) => String::new(),
                Err(e) => {
                    tracing::warn!("unprepare {}/{} ({}): {e}", c.namespace, c.name, c.uid);
                    e
                }
            };
            claims.insert(c.uid, v1::NodeUnprepareResourceResponse { error });
        }
        Ok(Response::new(v1::NodeUnprepareResourcesResponse { claims }))
    }
}

/// One message as the other version's: the two packages' messages are the same on the wire.
fn convert<A: Message, B: Message + Default>(a: &A) -> Result<B, Status> {
    B::decode(a.encode_to_vec().as_slice()).map_err(|e| Status::internal(format!("v1beta1 <-> v1: {e}")))
}

#[derive(Clone)]
pub struct DraV1beta1(pub DraV1);

#[tonic::async_trait]
impl v1beta1::dra_plugin_server::DraPlugin for DraV1beta1 {
    async fn node_prepare_resources(
        &self,
        r: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        use v1::dra_plugin_server::DraPlugin;
        let request: v1::NodePrepareResourcesRequest = convert(r.get_ref())?;
        let answer = self.0.node_prepare_resources(Request::new(request)).await?;
        Ok(Response::new(convert(answer.get_ref())?))
    }

    async fn node_unprepare_resources(
        &self,
        r: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        use v1::dra_plugin_server::DraPlugin;
        let request: v1::NodeUnprepareResourcesRequest = convert(r.get_ref())?;
        let answer = self.0.node_unprepare_resources(Request::new(request)).await?;
        Ok(Response::new(convert(answer.get_ref())?))
    }
}
