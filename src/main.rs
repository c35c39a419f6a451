//! `gavel`: one node of the auction server. See `gavel --help`.

use clap::Parser;
use gavel::config::LogFormat;
use gavel::{Application, Config, app, telemetry};

/// mimalloc rather than glibc's allocator. A bid allocates and frees many
/// small blocks across threads (request, message, event, reply), and glibc's
/// took about a quarter of the node's CPU under load (`_int_malloc`,
/// `malloc_consolidate`, `_int_free`: a `perf` profile of `many_auctions` on
/// Postgres). mimalloc also gives large blocks back to the system, such as
/// the 19 MiB each password hash takes for a moment (Argon2's memory cost).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init_tracing(config.log_format == LogFormat::Json);
    runtime()?.block_on(async {
        let application = Application::build(config).await?;
        application.run_until_stopped(app::shutdown_signal()).await
    })
}

/// A multi-threaded runtime without the LIFO slot. That slot runs the most
/// recently woken task first, so of a burst of requests arriving together the
/// last one reaches its auction first; in a hot auction every earlier bid of
/// the burst is then rejected as too low. Without it, bids reach the auction in
/// the order their sockets became readable (as near as two workers allow):
/// fairer to bidders, and several times more bids accepted under load.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("gavel");
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}
