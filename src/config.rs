//! Configuration: Istio `VirtualService`, `DestinationRule`, `ServiceEntry`,
//! `WorkloadEntry` and umbra's `ShadowAnalysis`, read verbatim from YAML and
//! validated into the typed [`model::Config`] the data plane runs on.

pub mod model;

pub use model::{Config, Diagnostic};
