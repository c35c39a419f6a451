//! The server over real sockets: in-process nodes on port 0 and the real
//! binary, against SQLite in a temp dir and a fresh Postgres database per test.

mod bad_input;
mod basics;
mod cluster;
mod cluster_events;
mod compose;
mod concurrency;
mod connections;
mod helpers;
mod observability;
mod openapi;
mod page;
mod process;
mod reads;
#[path = "../../actors/tests/reference/mod.rs"]
mod reference;
mod resilience;
mod tracing_spans;
mod ws;
mod ws_client;

/// Runs an `async fn(Backend)` test once on SQLite and once on Postgres.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            }
        )*
    };
}
