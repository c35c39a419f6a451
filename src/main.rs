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
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    app::runtime(config.worker_threads(cores))?.block_on(async {
        let application = Application::build(config).await?;
        application.run_until_stopped(app::shutdown_signal()).await
    })
}
