//! One integration-test binary: every test runs the real application against a real
//! nats-server over a real socket. Modules group the tests by area.

mod helpers;

mod alerting;
mod alertmanager;
mod attacks;
mod audit;
mod auth;
mod catalog;
mod cli;
mod console;
mod contract;
mod door;
mod durability;
mod embedded;
mod faults;
mod fuzz_smoke;
mod group_commit;
mod hostile;
mod introspection;
mod layers;
mod metrics;
mod oidc;
mod openapi;
mod promtool;
mod properties;
mod push;
mod registry;
mod scheduling;
mod scopes;
mod streams;
mod task_faults;
mod tasks;
mod traces;
