//! The standard gRPC services beside propd's own: health checking (`grpc.health.v1.Health`,
//! with a serving state per service, `NOT_SERVING` once shutdown begins) and server reflection
//! (v1 and v1alpha), so that `grpcurl` and Kubernetes gRPC probes work without proto files.

use propd_proto::v1::{
    admin_service_server, gossip_service_server, property_service_server, repair_service_server,
};
use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};

/// propd's own services, whose serving state the health service reports.
pub(crate) const PROPD_SERVICES: [&str; 4] = [
    property_service_server::SERVICE_NAME,
    gossip_service_server::SERVICE_NAME,
    repair_service_server::SERVICE_NAME,
    admin_service_server::SERVICE_NAME,
];

/// Sets the serving state the health service reports.
#[derive(Clone, Debug)]
pub(crate) struct Serving {
    reporter: HealthReporter,
}

impl Serving {
    /// Reports `status` for the server as a whole (`""`) and each of propd's services.
    pub(crate) async fn set(&self, status: ServingStatus) {
        for service in std::iter::once("").chain(PROPD_SERVICES) {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// The health service, and the handle that sets what it reports (every service `SERVING`).
pub(crate) async fn health() -> (
    Serving,
    tonic_health::pb::health_server::HealthServer<HealthService>,
) {
    let reporter = HealthReporter::new();
    let service = HealthService::from_health_reporter(reporter.clone());
    let serving = Serving { reporter };
    serving.set(ServingStatus::Serving).await;
    (
        serving,
        tonic_health::pb::health_server::HealthServer::new(service),
    )
}

/// Server reflection (v1 and v1alpha) over propd's services and the health service.
pub(crate) fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(propd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

#[cfg(test)]
mod tests {
    use tonic::Request;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health as _;

    use super::*;

    async fn check(service: &HealthService, name: &str) -> i32 {
        service
            .check(Request::new(HealthCheckRequest {
                service: name.to_owned(),
            }))
            .await
            .expect("a known service")
            .into_inner()
            .status
    }

    #[tokio::test]
    async fn every_service_serves_until_shutdown_turns_them_all_to_not_serving() {
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let serving = Serving { reporter };
        serving.set(ServingStatus::Serving).await;
        for name in std::iter::once("").chain(PROPD_SERVICES) {
            assert_eq!(check(&service, name).await, 1, "{name:?} SERVING");
        }
        serving.set(ServingStatus::NotServing).await;
        for name in std::iter::once("").chain(PROPD_SERVICES) {
            assert_eq!(check(&service, name).await, 2, "{name:?} NOT_SERVING");
        }
    }
}
