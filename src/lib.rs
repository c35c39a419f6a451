//! The gavel server: configuration, the HTTP edge, storage adapters (SQLite
//! and Postgres), metrics and logs. The auction domain and its actors live in
//! the `gavel-actors` crate; this crate implements the ports they need.

pub mod app;
pub mod auth;
pub mod bidding;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod events;
pub mod http;
pub mod listener;
pub mod ratelimit;
pub mod read_cache;
pub mod serve;
pub mod storage;
pub mod telemetry;
pub mod web;
pub mod ws;

pub use app::Application;
pub use config::Config;
