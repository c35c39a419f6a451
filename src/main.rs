//! `gavel`: one node of the auction server. See `gavel --help`.

use clap::Parser;
use gavel::config::LogFormat;
use gavel::{Application, Config, app, telemetry};

fn main() -> anyhow::Result<()> {
    return_large_blocks_to_the_system();
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

/// glibc's allocator serves a block above its mmap threshold from the system
/// and gives it back on free, but it raises that threshold to the size of the
/// largest such block freed. Password hashing takes 19 MiB a hash (Argon2's
/// memory cost), so after the first sign-ins every hash's block came from the
/// heaps of the threads that hashed and stayed there: 40 registrations left
/// the node at 380 MiB instead of 17. A fixed threshold of 1 MiB keeps large
/// blocks going back to the system.
fn return_large_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
