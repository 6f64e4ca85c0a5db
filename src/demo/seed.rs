//! The demo's seed configuration: the Istio YAML a user would write to
//! shadow `httpbin` v1 with v2 (ServiceEntry with both endpoints,
//! DestinationRule subsets, a VirtualService sending 100% to v1 and
//! mirroring 100% to v2), pointed at the demo backends' ephemeral ports and
//! loaded through the same loader as `umbra run`.

use std::net::SocketAddr;

use anyhow::anyhow;

use crate::config::model::Config;
use crate::config::{self, Diagnostic};

/// The file name diagnostics point at.
pub const FILE_NAME: &str = "demo.yaml";
/// The service port clients address (`Host: httpbin:8000`).
pub const PORT: u16 = 8000;
/// The Host the demo traffic carries; shadows see `httpbin-shadow:8000`.
pub const HOST: &str = "httpbin:8000";

/// The seed YAML for backends listening on `v1` and `v2`.
pub fn yaml(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
spec:
  hosts: [httpbin]
  ports:
  - number: {PORT}
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: {v1_ip}
    ports: {{http: {v1_port}}}
    labels: {{version: v1}}
  - address: {v2_ip}
    ports: {{http: {v2_port}}}
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts: [httpbin]
  http:
  - name: default
    route:
    - destination: {{host: httpbin, subset: v1, port: {{number: {PORT}}}}}
      weight: 100
    mirror: {{host: httpbin, subset: v2, port: {{number: {PORT}}}}}
    mirrorPercentage: {{value: 100.0}}
"#,
        v1_ip = v1.ip(),
        v1_port = v1.port(),
        v2_ip = v2.ip(),
        v2_port = v2.port(),
    )
}

/// Loads the seed YAML with the real loader.
pub fn load(v1: SocketAddr, v2: SocketAddr) -> anyhow::Result<Config> {
    let text = yaml(v1, v2);
    match config::load_str(FILE_NAME, &text) {
        Ok(config) => {
            for warning in &config.warnings {
                tracing::warn!(%warning, "demo config");
            }
            Ok(config)
        }
        Err(errors) => Err(anyhow!("the demo's own config does not load:\n{}", {
            let lines: Vec<String> = errors.errors.iter().map(Diagnostic::to_string).collect();
            lines.join("\n")
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_points_at_the_backends_and_mirrors_everything() {
        let v1: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let v2: SocketAddr = "127.0.0.1:4002".parse().unwrap();
        let text = yaml(v1, v2);
        assert!(text.contains("ports: {http: 4001}"), "{text}");
        assert!(text.contains("ports: {http: 4002}"), "{text}");
        assert!(text.contains("mirrorPercentage: {value: 100.0}"), "{text}");
        let config = load(v1, v2).unwrap();
        let route = &config.virtual_services[0].routes[0];
        assert_eq!(route.destinations[0].weight, 100);
        assert_eq!(
            route.destinations[0].destination.subset.as_deref(),
            Some("v1")
        );
        assert_eq!(route.destinations[0].destination.endpoints[0].port, 4001);
        assert_eq!(route.mirrors[0].destination.subset.as_deref(), Some("v2"));
        assert_eq!(route.mirrors[0].destination.endpoints[0].port, 4002);
        assert_eq!(route.mirrors[0].per_million, 1_000_000);
    }
}
