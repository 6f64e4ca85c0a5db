//! The one integration-test binary: each module covers one capability,
//! against umbra running in-process with real backends on 127.0.0.1:0.

mod analysis;
mod config;
mod faults;
mod hostile;
mod mirror;
mod pool;
mod proxy;
mod server;
mod support;
mod tls;
