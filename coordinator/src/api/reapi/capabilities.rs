//! `Capabilities.GetCapabilities`: what this server offers, the first
//! thing every client asks.

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::build::bazel::semver::SemVer;
use re::capabilities_server::Capabilities;
use tonic::{Request, Response, Status};

use super::{MAX_BATCH_TOTAL_BYTES, offered_functions};

/// API versions spoken: 2.0 (Bazel 4 speaks only it) to 2.3.
const LOW_API_VERSION: (i32, i32) = (2, 0);
const HIGH_API_VERSION: (i32, i32) = (2, 3);

fn semver((major, minor): (i32, i32)) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

/// The capabilities service; the same answer on every replica.
pub struct CapabilitiesService;

/// What this server offers. Remote execution is not offered yet: the
/// cache (CAS, ByteStream, the action cache, which clients may update) is.
pub fn server_capabilities() -> re::ServerCapabilities {
    re::ServerCapabilities {
        cache_capabilities: Some(re::CacheCapabilities {
            digest_functions: offered_functions(),
            action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                update_enabled: true,
            }),
            cache_priority_capabilities: None,
            max_batch_total_size_bytes: MAX_BATCH_TOTAL_BYTES as i64,
            symlink_absolute_path_strategy: re::symlink_absolute_path_strategy::Value::Disallowed
                as i32,
            supported_compressors: Vec::new(),
            supported_batch_update_compressors: Vec::new(),
            ..Default::default()
        }),
        execution_capabilities: Some(re::ExecutionCapabilities {
            digest_function: re::digest_function::Value::Sha256 as i32,
            exec_enabled: true,
            execution_priority_capabilities: None,
            supported_node_properties: Vec::new(),
            digest_functions: offered_functions(),
        }),
        deprecated_api_version: None,
        low_api_version: Some(semver(LOW_API_VERSION)),
        high_api_version: Some(semver(HIGH_API_VERSION)),
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        _request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        Ok(Response::new(server_capabilities()))
    }
}
