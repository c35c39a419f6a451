//! `gavel`: one node of the auction server. See `gavel --help`.

use clap::Parser;
use gavel::config::LogFormat;
use gavel::{Application, Config, app, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init_tracing(config.log_format == LogFormat::Json);
    let application = Application::build(config).await?;
    application.run_until_stopped(app::shutdown_signal()).await
}
