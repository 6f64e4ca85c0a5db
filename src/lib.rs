//! umbra: a traffic-mirroring ("shadowing") proxy configured with Istio
//! resources.
//!
//! The modules follow a request through the proxy:
//! `config` (Istio YAML → validated model) → `routing` (pick a route and a
//! weighted destination) → `proxy` (forward to the primary, stream the
//! response back) → `mirror` (sample, tee the body, fire-and-forget shadow
//! with a `-shadow` host) → `analysis` (compare primary with shadow, verdict)
//! → `admin` (metrics, JSON API, dashboard). `server` owns listeners,
//! connection limits, reload and shutdown.

pub mod accesslog;
pub mod admin;
pub mod analysis;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod metrics;
pub mod mirror;
pub mod proxy;
pub mod routing;
pub mod server;
